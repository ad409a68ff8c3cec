//! `nanodetd run`: loads the config, starts logging, hands over to the
//! daemon.

use std::path::PathBuf;

use clap::Args;

use super::Failure;
use nanodetd::config::Config;
use nanodetd::daemon::DaemonError;

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
    nanodetd::logging::start(config.log.level);
    // Before any thread starts: arenas are handed out as threads first
    // allocate.
    let environment = std::env::var_os("MALLOC_ARENA_MAX");
    if let Some(arenas) = nanodetd::allocator::arena_limit(environment.as_deref())
        && nanodetd::allocator::limit_arenas(arenas)
    {
        log::info!("malloc: at most {arenas} arenas (MALLOC_ARENA_MAX overrides)");
    }
    // rustls needs one process-wide crypto provider; ring is the one built in.
    let _ = rustls::crypto::ring::default_provider().install_default();
    nanodetd::daemon::run(&args.config, config).map_err(|e| match e {
        // The config names a model this box cannot use: restarting into
        // the same config would fail the same way (and redo an INT8
        // calibration each time), so it is EX_CONFIG, which the unit does
        // not restart on.
        e @ (DaemonError::Model { .. } | DaemonError::TrialLoad { .. }) => {
            Failure::Config(anyhow::Error::new(e).context("nanodetd run"))
        }
        e => Failure::Runtime(anyhow::Error::new(e).context("nanodetd run")),
    })
}
