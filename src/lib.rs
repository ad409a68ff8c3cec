//! nanodetd: NanoDet object detection for edge cameras.
//!
//! The library is the pure core plus the backends: [`frame`] decodes
//! images, [`preprocess`] turns them into network input, [`backend`] runs
//! the network, [`model`] understands its outputs, [`postprocess`] applies
//! NMS, and [`detector`] strings those together for one frame. [`track`]
//! turns a camera's detections into objects with lifecycle events. [`eval`]
//! scores detections the way pycocotools does.

pub mod backend;
pub mod capture;
pub mod config;
pub mod detector;
pub mod eval;
pub mod frame;
pub mod model;
pub mod postprocess;
pub mod preprocess;
pub mod track;
