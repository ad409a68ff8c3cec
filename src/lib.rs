//! nanodetd: NanoDet object detection for edge cameras.
//!
//! The detection core is the `nanodetd-core` crate (crates/core), re-exported
//! here under the same module names: [`frame`], [`pixels`], [`buffer`],
//! [`preprocess`], [`backend`], [`model`], [`postprocess`], [`detector`],
//! [`track`], [`eval`], [`quantize`], [`engine_cache`], [`contain`].
//!
//! This crate is the daemon's shell above it: [`capture`] reads cameras,
//! [`config`] reads and checks the TOML, [`daemon`] wires the threads and
//! tasks, [`mqtt`] publishes, [`reload`] watches the config, [`watchdog`]
//! tells systemd the pipeline is alive, [`metrics`] keeps the figures that
//! the stats topic and the Prometheus endpoint share, [`prepare`] makes a model ready (the
//! one path the daemon and every command take), [`logging`] sends lines to journald
//! or stderr, and [`allocator`] sets how glibc's malloc keeps the daemon's
//! memory.
//!
//! [`fuzzing`] holds the entry points of the fuzz targets (`fuzz/`).

#[cfg(feature = "cuda")]
pub use nanodetd_core::gpu;
pub use nanodetd_core::{
    backend, buffer, contain, detector, engine_cache, errors, eval, frame, model, pixels,
    postprocess, preprocess, quantize, track,
};

pub mod allocator;
pub mod capture;
pub mod config;
pub mod daemon;
pub mod fuzzing;
pub mod logging;
pub mod metrics;
pub mod mqtt;
pub mod prepare;
pub mod reload;
pub mod watchdog;
