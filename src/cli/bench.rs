//! `nanodetd bench`: per-stage latency of the detection pipeline.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use clap::Args;

use nanodetd::detector::DetectionParams;
use nanodetd::frame::Frame;

use super::{Failure, ModelArgs, PrecisionArgs};

/// Arguments of `bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    precision: PrecisionArgs,
    /// Image to run (default: a synthetic 1920x1080 JPEG, made in memory).
    #[arg(long)]
    image: Option<PathBuf>,
    /// Timed iterations.
    #[arg(long, default_value_t = 50)]
    iters: usize,
    /// Untimed iterations first.
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// Print the figures as JSON.
    #[arg(long)]
    json: bool,
}

/// A 1920x1080 scene with edges and gradients, JPEG-encoded like a camera
/// frame would be.
fn synthetic_jpeg() -> Result<Vec<u8>, Failure> {
    let image = image::RgbImage::from_fn(1920, 1080, |x, y| {
        let band = ((x / 240 + y / 270) % 2) as u8 * 90;
        image::Rgb([
            (x % 256) as u8,
            (y % 256) as u8,
            band.wrapping_add((x ^ y) as u8 / 4),
        ])
    });
    let mut bytes = Vec::new();
    image
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Jpeg,
        )
        .map_err(|e| Failure::Runtime(e.into()))?;
    Ok(bytes)
}

fn quantiles(samples: &mut [Duration]) -> (f64, f64) {
    samples.sort_unstable();
    let at = |q: f64| {
        let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    (at(0.5), at(0.99))
}

/// Peak resident set size of this process, from the kernel.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

pub fn run(args: &BenchArgs) -> Result<(), Failure> {
    if args.iters == 0 {
        return Err(Failure::BadInput(anyhow!("--iters must be at least 1")));
    }
    let detector = args
        .model
        .detector_at(DetectionParams::LIVE, &args.precision)?;
    let mut session = detector.session().map_err(|e| Failure::Runtime(e.into()))?;
    let (bytes, origin) = match &args.image {
        Some(path) => (
            std::fs::read(path)
                .map_err(|e| Failure::BadInput(anyhow!("{}: cannot read: {e}", path.display())))?,
            path.display().to_string(),
        ),
        None => (synthetic_jpeg()?, "synthetic 1920x1080 JPEG".to_owned()),
    };
    let runtime = |e: nanodetd::detector::DetectorError| Failure::Runtime(e.into());

    let mut stages: [Vec<Duration>; 5] = Default::default();
    let mut size = (0, 0);
    let mut found = 0;
    for i in 0..args.warmup + args.iters {
        let t0 = Instant::now();
        let frame = Frame::decode(&bytes, &origin).map_err(|e| Failure::BadInput(e.into()))?;
        let t1 = Instant::now();
        let transform = session.preprocess(&frame).map_err(runtime)?;
        let t2 = Instant::now();
        session.infer().map_err(runtime)?;
        let t3 = Instant::now();
        let detections = session.postprocess(&transform).map_err(runtime)?;
        let t4 = Instant::now();
        if i >= args.warmup {
            for (s, d) in stages
                .iter_mut()
                .zip([t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0])
            {
                s.push(d);
            }
        }
        size = (frame.width(), frame.height());
        found = detections.len();
    }
    let names = [
        "decode image",
        "preprocess",
        "inference",
        "postprocess",
        "total",
    ];
    let figures: Vec<(&str, f64, f64)> = names
        .iter()
        .zip(stages.iter_mut())
        .map(|(n, s)| {
            let (median, p99) = quantiles(s);
            (*n, median, p99)
        })
        .collect();
    let layout = detector.layout();
    if args.json {
        let stages: serde_json::Map<String, serde_json::Value> = figures
            .iter()
            .map(|(n, m, p)| {
                (
                    (*n).to_owned(),
                    serde_json::json!({"median_ms": m, "p99_ms": p}),
                )
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "model": args.model.model.display().to_string(),
                "backend": detector.engine().backend().to_string(),
                "layout": layout.kind.to_string(),
                "input": [layout.input_width, layout.input_height],
                "image": origin,
                "image_size": [size.0, size.1],
                "iterations": args.iters,
                "detections": found,
                "stages": stages,
                "peak_rss_mib": peak_rss_mib(),
            })
        );
        return Ok(());
    }
    println!(
        "model {} ({} layout, {}x{} input) on {}; image {} ({}x{}); {} iterations after {} warm-up; {} detections",
        args.model.model.display(),
        layout.kind,
        layout.input_width,
        layout.input_height,
        detector.engine().backend(),
        origin,
        size.0,
        size.1,
        args.iters,
        args.warmup,
        found
    );
    println!("  {:<14} {:>10} {:>10}", "stage", "median ms", "p99 ms");
    for (name, median, p99) in &figures {
        println!("  {name:<14} {median:>10.3} {p99:>10.3}");
    }
    if let Some(rss) = peak_rss_mib() {
        println!("  peak RSS {rss:.1} MiB");
    }
    Ok(())
}
