//! `nanodetd camera`: opens a V4L2 device the way the daemon does, streams
//! a number of frames through the same conversion, and reports what was
//! negotiated and delivered (one JSON line), optionally saving one
//! converted frame. For checking a camera before configuring it, and for
//! the V4L2 tests in a VM (tests/v4l2-vm).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, anyhow};
use clap::Args;

use nanodetd::capture::{
    CameraFormat, CaptureIo, IfUnsupported, V4l2Camera, V4l2Error, V4l2Request,
};
use nanodetd::engine_cache::write_atomically;
use nanodetd::frame::{Frame, PixelFormat};

use super::{Failure, parse_size};

/// Arguments of `camera`.
#[derive(Args, Debug)]
pub struct CameraArgs {
    /// The device node.
    #[arg(default_value = "/dev/video0")]
    device: PathBuf,
    /// Pixel format to ask for (mjpeg, yuyv, uyvy, nv12, grey, rgb24,
    /// bgr24); chosen as the daemon would when unset.
    #[arg(long)]
    format: Option<CameraFormat>,
    /// Size WxH to ask for.
    #[arg(long, value_parser = parse_size)]
    size: Option<(usize, usize)>,
    /// Frame rate to ask for.
    #[arg(long)]
    fps: Option<f32>,
    /// Fail when the format or size is not offered, instead of streaming
    /// what is (the config's if_unsupported = "refuse").
    #[arg(long)]
    refuse: bool,
    /// Streaming I/O (the config's io): with no GPU here, `auto` is mmap.
    #[arg(long, value_enum, default_value_t = CaptureIo::Auto)]
    io: CaptureIo,
    /// Take each frame as the raw buffer a GPU detector would get, then
    /// convert it on the CPU: the daemon's hand-off, tested without a GPU.
    /// With `--io auto` this streams USERPTR where the driver allows.
    #[arg(long)]
    raw: bool,
    /// Frames to stream.
    #[arg(long, default_value_t = 50)]
    frames: u64,
    /// Save the last converted frame as a binary PPM (P6; P5 for grey).
    #[arg(long)]
    save: Option<PathBuf>,
}

/// What one run measured, printed as JSON.
#[derive(serde::Serialize)]
struct CameraReport<'a> {
    device: &'a Path,
    format: &'static str,
    width: usize,
    height: usize,
    bytes_per_line: usize,
    /// "userptr" or "mmap".
    io: &'static str,
    /// Frames that came as the driver's own buffer, not a copy.
    lent_buffers: u64,
    /// The rate the driver settled on.
    negotiated_fps: Option<f32>,
    /// Frames converted.
    frames: u64,
    /// Frames that were short or would not convert.
    broken: u64,
    /// Converted frames per second, first frame to last.
    measured_fps: Option<f32>,
    saved: Option<&'a Path>,
}

fn format_name(format: CameraFormat) -> &'static str {
    CameraFormat::NAMED
        .iter()
        .find(|(_, f)| *f == format)
        .map_or("unknown", |(name, _)| name)
}

pub fn run(args: &CameraArgs) -> Result<(), Failure> {
    nanodetd::logging::start(log::LevelFilter::Info);
    if args.frames == 0 {
        return Err(Failure::BadInput(anyhow!("--frames must be at least 1")));
    }
    let size = args
        .size
        .map(|(w, h)| Ok::<_, anyhow::Error>((u32::try_from(w)?, u32::try_from(h)?)))
        .transpose()
        .map_err(|e| Failure::BadInput(e.context("--size")))?;
    let request = V4l2Request {
        format: args.format,
        size,
        fps: args.fps,
        if_unsupported: if args.refuse {
            IfUnsupported::Refuse
        } else {
            IfUnsupported::Negotiate
        },
        io: args.io,
        max_pixels: nanodetd::frame::MAX_PIXELS,
    };
    let mut camera = V4l2Camera::open(&args.device, &request).map_err(|e| match e {
        V4l2Error::NoMatch { .. }
        | V4l2Error::FormatRefused { .. }
        | V4l2Error::NoUserptr { .. }
        | V4l2Error::OverBudget { .. } => Failure::BadInput(e.into()),
        other => Failure::Runtime(other.into()),
    })?;
    let layout = camera.layout();
    let mut converted = 0u64;
    let mut broken = 0u64;
    let mut lent_buffers = 0u64;
    let mut first: Option<Instant> = None;
    let mut last_frame: Option<Frame> = None;
    // Bad frames count towards the total, so a camera that sends only
    // garbage still ends.
    while converted + broken < args.frames {
        let frame = camera.next_capture(args.raw).and_then(|captured| {
            lent_buffers += u64::from(captured.is_lent());
            captured.into_frame().map_err(V4l2Error::Broken)
        });
        match frame {
            Ok(frame) => {
                converted += 1;
                first.get_or_insert_with(Instant::now);
                last_frame = Some(frame);
            }
            Err(V4l2Error::Broken(e)) => {
                broken += 1;
                log::warn!("{e}");
            }
            Err(lost) => return Err(Failure::Runtime(lost.into())),
        }
    }
    let measured_fps = first
        .filter(|_| converted > 1)
        .map(|t| (converted - 1) as f32 / t.elapsed().as_secs_f32());
    if let (Some(path), Some(frame)) = (&args.save, &last_frame) {
        write_atomically(path, &ppm(frame))
            .with_context(|| format!("saving {}", path.display()))
            .map_err(Failure::Runtime)?;
    }
    let report = CameraReport {
        device: &args.device,
        format: format_name(layout.format),
        width: layout.width,
        height: layout.height,
        bytes_per_line: layout.bytes_per_line,
        io: camera.io(),
        lent_buffers,
        negotiated_fps: camera.frame_rate(),
        frames: converted,
        broken,
        measured_fps,
        saved: args.save.as_deref().filter(|_| last_frame.is_some()),
    };
    let line = serde_json::to_string(&report).map_err(|e| Failure::Runtime(e.into()))?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").map_err(|e| Failure::Runtime(e.into()))?;
    if converted == 0 {
        return Err(Failure::Runtime(anyhow!(
            "{}: none of {} frames converted",
            args.device.display(),
            args.frames
        )));
    }
    Ok(())
}

/// The frame as a binary PPM (RGB) or PGM (grey): lossless, and readable
/// by anything, a ten-line parser included.
fn ppm(frame: &Frame) -> Vec<u8> {
    let (w, h) = (frame.width(), frame.height());
    let (magic, pixels): (&str, Vec<u8>) = match frame.format() {
        PixelFormat::Gray8 => ("P5", frame.data().to_vec()),
        PixelFormat::Rgb8 => ("P6", frame.data().to_vec()),
        PixelFormat::Bgr8 => (
            "P6",
            frame
                .data()
                .chunks_exact(3)
                .flat_map(|p| [p[2], p[1], p[0]])
                .collect(),
        ),
    };
    let mut out = format!("{magic}\n{w} {h}\n255\n").into_bytes();
    out.extend_from_slice(&pixels);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ppm_is_rgb_whatever_the_frame_order() {
        let bgr = Frame::from_packed(2, 1, PixelFormat::Bgr8, vec![1, 2, 3, 4, 5, 6], "t").unwrap();
        assert_eq!(ppm(&bgr), b"P6\n2 1\n255\n\x03\x02\x01\x06\x05\x04");
        let grey = Frame::from_packed(1, 2, PixelFormat::Gray8, vec![7, 8], "t").unwrap();
        assert_eq!(ppm(&grey), b"P5\n1 2\n255\n\x07\x08");
    }

    #[test]
    fn every_format_has_its_config_name() {
        for (name, format) in CameraFormat::NAMED {
            assert_eq!(format_name(format), name);
            assert_eq!(name.parse::<CameraFormat>(), Ok(format));
        }
        assert!(
            "h264"
                .parse::<CameraFormat>()
                .unwrap_err()
                .to_string()
                .contains("uyvy")
        );
    }
}
