//! The integration tests, in one binary: each file below was a test crate
//! of its own, and each linked the whole of nanodetd (twelve links of a
//! few hundred MB). One binary links once. Run a part with a filter, e.g.
//! `cargo test --test integration daemon::`.

mod support;

mod batch;
mod camera_formats;
mod cli;
mod daemon;
mod demo;
mod engine_cache;
mod fuzz_corpora;
mod gpu;
mod layers;
mod metrics;
mod onnxruntime;
mod quantize;
mod real_models;
mod rtsp;
mod scripts;
mod systemd_unit;
mod tensorrt;
mod tiny_model;
