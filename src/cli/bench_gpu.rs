//! `nanodetd bench-gpu`: the GPU preprocessing path timed stage by stage
//! with CUDA events, beside the CPU path it replaces, in the same run.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use clap::Args;
use cudarc::driver::sys::CUevent_flags;

use nanodetd::capture::{CameraFormat, encode, to_frame};
use nanodetd::frame::{Frame, PixelFormat};
use nanodetd::gpu::Gpu;
use nanodetd::preprocess::{
    CameraImage, GpuPreprocessor, PreprocessSpec, ResizeMode, preprocess_into,
};

use super::{Failure, parse_size};

/// Arguments of `bench-gpu`.
#[derive(Args, Debug)]
pub struct BenchGpuArgs {
    /// Photo to show the camera (scaled to the frame size); default: a
    /// synthetic scene.
    #[arg(long)]
    image: Option<PathBuf>,
    /// Camera frame as WIDTHxHEIGHT.
    #[arg(long, default_value = "1920x1080", value_parser = parse_size)]
    frame: (usize, usize),
    /// Camera pixel format: yuyv, nv12, grey, rgb24 or bgr24.
    #[arg(long, default_value = "yuyv", value_parser = parse_format)]
    format: CameraFormat,
    /// Network input as WIDTHxHEIGHT.
    #[arg(long, default_value = "320x320", value_parser = parse_size)]
    input: (usize, usize),
    /// stretch or letterbox.
    #[arg(long, default_value = "stretch")]
    resize: ResizeMode,
    /// CUDA device.
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// Timed iterations of each stage.
    #[arg(long, default_value_t = 500)]
    iters: usize,
}

fn parse_format(s: &str) -> Result<CameraFormat, String> {
    match s {
        "yuyv" => Ok(CameraFormat::Yuyv),
        "nv12" => Ok(CameraFormat::Nv12),
        "grey" => Ok(CameraFormat::Grey),
        "rgb24" => Ok(CameraFormat::Rgb24),
        "bgr24" => Ok(CameraFormat::Bgr24),
        other => Err(format!(
            "{other:?}: the GPU path takes yuyv, nv12, grey, rgb24 or bgr24"
        )),
    }
}

/// Median and 99th percentile, in microseconds.
fn quantiles_us(samples: &mut [f64]) -> (f64, f64) {
    samples.sort_unstable_by(f64::total_cmp);
    let at = |q: f64| {
        let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples.get(i).copied().unwrap_or(0.0)
    };
    (at(0.5), at(0.99))
}

pub fn run(args: &BenchGpuArgs) -> Result<(), Failure> {
    let runtime = |e: anyhow::Error| Failure::Runtime(e);
    if args.iters == 0 {
        return Err(Failure::BadInput(anyhow!("--iters must be at least 1")));
    }
    let (w, h) = args.frame;
    let picture = match &args.image {
        Some(path) => image::open(path)
            .map_err(|e| Failure::BadInput(anyhow!("{}: {e}", path.display())))?
            .to_rgb8(),
        None => image::RgbImage::from_fn(w as u32, h as u32, |x, y| {
            image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x ^ y) % 256) as u8])
        }),
    };
    let picture = image::imageops::resize(
        &picture,
        w as u32,
        h as u32,
        image::imageops::FilterType::Triangle,
    );
    let frame = Frame::from_packed(w, h, PixelFormat::Rgb8, picture.into_raw(), "bench")
        .map_err(|e| runtime(e.into()))?;
    let (layout, bytes) = encode(&frame, args.format, 0).map_err(|e| runtime(e.into()))?;
    let spec = PreprocessSpec::nanodet(args.input.0, args.input.1, args.resize);

    let gpu = Arc::new(Gpu::open(args.device).map_err(|e| runtime(e.into()))?);
    let mut pre = GpuPreprocessor::new(gpu.clone()).map_err(|e| runtime(e.into()))?;
    let stream = gpu.stream().clone();
    let cuda = |e: cudarc::driver::DriverError| Failure::Runtime(e.into());
    let mut input = stream.alloc_zeros::<f32>(spec.tensor_len()).map_err(cuda)?;
    let mut host_tensor = vec![0f32; spec.tensor_len()];
    let image = CameraImage::Raw {
        layout,
        bytes: &bytes,
        origin: "bench",
    };
    let events = || {
        let timed = Some(CUevent_flags::CU_EVENT_DEFAULT);
        Ok::<_, Failure>((
            gpu.context().new_event(timed).map_err(cuda)?,
            gpu.context().new_event(timed).map_err(cuda)?,
        ))
    };
    let (start, end) = events()?;
    // SAFETY: filled from `bytes` before it is read.
    #[allow(unsafe_code)]
    let mut pinned = unsafe { gpu.context().alloc_pinned::<u8>(bytes.len()) }.map_err(cuda)?;
    pinned.as_mut_slice().map_err(cuda)?.copy_from_slice(&bytes);
    let mut frame_on_device = stream.alloc_zeros::<u8>(bytes.len()).map_err(cuda)?;

    // Warm-up: compiles nothing more, but faults in the buffers and taps.
    for _ in 0..20 {
        pre.preprocess(image, &spec, &mut input.slice_mut(..))
            .map_err(|e| runtime(e.into()))?;
    }
    stream.synchronize().map_err(cuda)?;

    let mut staging = Vec::with_capacity(args.iters);
    let mut upload = Vec::with_capacity(args.iters);
    let mut kernel = Vec::with_capacity(args.iters);
    let mut download = Vec::with_capacity(args.iters);
    let mut end_to_end = Vec::with_capacity(args.iters);
    for _ in 0..args.iters {
        // stage(): memcpy into pinned memory, and the upload queued.
        let t0 = Instant::now();
        pre.stage(image).map_err(|e| runtime(e.into()))?;
        staging.push(t0.elapsed().as_secs_f64() * 1e6);
        stream.synchronize().map_err(cuda)?;

        // The upload alone, the same size from the same kind of memory.
        start.record(&stream).map_err(cuda)?;
        stream
            .memcpy_htod(&pinned, &mut frame_on_device)
            .map_err(cuda)?;
        end.record(&stream).map_err(cuda)?;
        end.synchronize().map_err(cuda)?;
        upload.push(f64::from(start.elapsed_ms(&end).map_err(cuda)?) * 1e3);

        start.record(&stream).map_err(cuda)?;
        pre.launch(&spec, &mut input.slice_mut(..))
            .map_err(|e| runtime(e.into()))?;
        end.record(&stream).map_err(cuda)?;
        end.synchronize().map_err(cuda)?;
        kernel.push(f64::from(start.elapsed_ms(&end).map_err(cuda)?) * 1e3);

        start.record(&stream).map_err(cuda)?;
        stream.memcpy_dtoh(&input, &mut host_tensor).map_err(cuda)?;
        end.record(&stream).map_err(cuda)?;
        end.synchronize().map_err(cuda)?;
        download.push(f64::from(start.elapsed_ms(&end).map_err(cuda)?) * 1e3);

        let t0 = Instant::now();
        pre.preprocess(image, &spec, &mut input.slice_mut(..))
            .map_err(|e| runtime(e.into()))?;
        stream.synchronize().map_err(cuda)?;
        end_to_end.push(t0.elapsed().as_secs_f64() * 1e6);
    }

    // The peer: the CPU path the daemon takes without a GPU, on the same
    // buffer (conversion to BGR, then the warp).
    let mut cpu_convert = Vec::with_capacity(args.iters);
    let mut cpu_warp = Vec::with_capacity(args.iters);
    let cpu_iters = args.iters.min(200);
    for _ in 0..cpu_iters {
        let t0 = Instant::now();
        let converted = to_frame(&layout, &bytes, "bench").map_err(|e| runtime(e.into()))?;
        let t1 = Instant::now();
        preprocess_into(&converted, &spec, &mut host_tensor).map_err(|e| runtime(e.into()))?;
        let t2 = Instant::now();
        cpu_convert.push(Duration::as_secs_f64(&(t1 - t0)) * 1e6);
        cpu_warp.push(Duration::as_secs_f64(&(t2 - t1)) * 1e6);
    }

    let (cc_major, cc_minor) = gpu.compute_capability();
    println!(
        "{} (sm_{cc_major}{cc_minor}); {w}x{h} {:?} ({} bytes) -> {}x{} {:?} f32 CHW ({} bytes); {} iterations (CPU peer: {cpu_iters})",
        gpu.name(),
        args.format,
        bytes.len(),
        spec.width,
        spec.height,
        spec.resize,
        spec.tensor_len() * 4,
        args.iters,
    );
    println!("  {:<44} {:>10} {:>10}", "stage", "median µs", "p99 µs");
    let rows: [(&str, &mut Vec<f64>); 7] = [
        ("GPU kernel (convert+warp+normalise), events", &mut kernel),
        ("host -> device frame copy (pinned), events", &mut upload),
        ("stage(): memcpy into pinned + queue upload", &mut staging),
        ("device -> host tensor copy, events", &mut download),
        ("GPU path end to end (stage+kernel+sync)", &mut end_to_end),
        ("CPU peer: convert to BGR", &mut cpu_convert),
        ("CPU peer: warp+normalise", &mut cpu_warp),
    ];
    for (name, samples) in rows {
        let (median, p99) = quantiles_us(samples);
        println!("  {name:<44} {median:>10.1} {p99:>10.1}");
    }
    Ok(())
}
