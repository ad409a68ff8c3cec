//! `nanodetd bench-gpu`: the GPU preprocessing path timed stage by stage
//! with CUDA events, beside the CPU path it replaces, in the same run.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use clap::Args;
use cudarc::driver::sys::CUevent_flags;

use nanodetd::backend::onnxruntime::{OnnxRuntimeOptions, Provider, cuda_model};
use nanodetd::backend::{self, BackendChoice, EngineOptions, InputBatch};
use nanodetd::capture::{BufferLayout, CameraFormat, encode, to_frame};
use nanodetd::detector::{DetectionParams, Detector};
use nanodetd::frame::{Frame, PixelFormat};
use nanodetd::gpu::Gpu;
use nanodetd::model::LayoutOverrides;
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
    /// Camera pixel format: yuyv, uyvy, nv12, grey, rgb24 or bgr24.
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
    /// Also time the whole detector on the GPU with this NanoDet ONNX:
    /// the frame in pinned host memory to detections in host memory.
    #[arg(long)]
    model: Option<PathBuf>,
    /// The detector's backend: onnxruntime (its CUDA provider) or
    /// tensorrt.
    #[arg(long, default_value = "onnxruntime")]
    backend: BackendChoice,
    /// ONNX Runtime's GPU provider: cuda or tensorrt.
    #[arg(long, default_value = "cuda", value_parser = super::parse_provider)]
    provider: Provider,
    /// Run ONNX Runtime's provider without a CUDA graph.
    #[arg(long)]
    no_cuda_graph: bool,
    /// Frames per run of the detector (ONNX Runtime's CUDA provider: the
    /// model made batchable, as `[model.onnxruntime] max_batch` does).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=nanodetd::detector::MAX_BATCH as i64))]
    batch: u32,
    /// Float16 weights on ONNX Runtime's CUDA provider, as
    /// `precision = "fp16"` does.
    #[arg(long)]
    fp16: bool,
    /// Write the model the CUDA provider runs (batchable, FP16) here, for
    /// the peers to run the same one.
    #[arg(long)]
    write_model: Option<PathBuf>,
}

fn parse_format(s: &str) -> Result<CameraFormat, String> {
    match s.parse::<CameraFormat>().map_err(|e| e.to_string())? {
        CameraFormat::Mjpeg => Err("the GPU path takes raw formats, not mjpeg".into()),
        format => Ok(format),
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
    if let Some(model) = &args.model {
        bench_detector(args, model, &frame, layout, &bytes)?;
    }
    Ok(())
}

/// The whole detector on the GPU: a camera frame already in pinned host
/// memory → upload → preprocessing kernel → inference → outputs to the
/// host → decode and NMS, beside inference alone and the CPU's answer on
/// the same frame.
#[allow(unsafe_code)]
fn bench_detector(
    args: &BenchGpuArgs,
    model: &std::path::Path,
    frame: &Frame,
    layout: BufferLayout,
    bytes: &[u8],
) -> Result<(), Failure> {
    let runtime = |e: anyhow::Error| Failure::Runtime(e);
    let cuda = |e: cudarc::driver::DriverError| Failure::Runtime(e.into());
    // The batch check's verdict, kept between runs of the bench.
    let memo = std::env::temp_dir().join("nanodetd-bench-gpu");
    let options = EngineOptions {
        input_size: None,
        onnxruntime: OnnxRuntimeOptions {
            provider: args.provider,
            device: args.device,
            cuda_graph: !args.no_cuda_graph,
            max_batch: args.batch,
            fp16: args.fp16,
            batch_memo: memo.clone(),
            ..OnnxRuntimeOptions::default()
        },
    };
    if let Some(out) = &args.write_model {
        let onnx = std::fs::read(model)
            .map_err(|e| Failure::BadInput(anyhow!("{}: {e}", model.display())))?;
        let made = cuda_model(&onnx, args.fp16, args.batch, &memo);
        std::fs::write(out, made.onnx.as_deref().unwrap_or(&onnx))
            .map_err(|e| runtime(anyhow!("{}: {e}", out.display())))?;
        println!(
            "{}: the CUDA provider's model, batch up to {} ({})",
            out.display(),
            made.max_batch,
            made.notes.join("; ")
        );
    }
    let engine = backend::open_chosen(args.backend, &|kind| {
        backend::open_engine(kind, model, &options)
    })
    .map_err(|e| Failure::BadInput(e.into()))?;
    println!(
        "{}: {} backend; {}",
        model.display(),
        engine.backend(),
        engine.notes().join("; ")
    );
    let params = DetectionParams::LIVE;
    let detector = Arc::new(
        Detector::new(engine, &LayoutOverrides::default(), None, params)
            .map_err(|e| Failure::BadInput(e.into()))?,
    );
    let mut session = detector.session().map_err(|e| runtime(e.into()))?;
    if !session.on_gpu() {
        return Err(runtime(anyhow!(
            "the engine runs on the CPU here (see the notes above): nothing to time on the GPU"
        )));
    }
    let gpu = Gpu::shared(args.device).map_err(|e| runtime(e.into()))?;
    // The camera frame, where a capture into pinned memory leaves it.
    // SAFETY: filled from `bytes` before it is read.
    let mut pinned = unsafe { gpu.context().alloc_pinned::<u8>(bytes.len()) }.map_err(cuda)?;
    pinned.as_mut_slice().map_err(cuda)?.copy_from_slice(bytes);

    let batch = session.max_batch().min(args.batch as usize);
    if batch < args.batch as usize {
        return Err(runtime(anyhow!(
            "the session takes {batch} frames a run, not {} (see the notes above)",
            args.batch
        )));
    }
    // The same frame in every slot of a run, as `batch` cameras would
    // send; the first slot's detections are compared below.
    let mut rows_kept = None;
    let mut detect = |on_gpu: bool| {
        session
            .decode_on_gpu(on_gpu)
            .map_err(|e| runtime(e.into()))?;
        let mut transforms = Vec::with_capacity(batch);
        for slot in 0..batch {
            transforms.push(
                session
                    .preprocess_pinned_into(slot, layout, &pinned, "bench")
                    .map_err(|e| runtime(e.into()))?,
            );
        }
        session.infer_batch(batch).map_err(|e| runtime(e.into()))?;
        let kept = session.kept_rows(0);
        let mut first = Vec::new();
        for (slot, transform) in transforms.iter().enumerate() {
            let found = session
                .postprocess_slot(slot, transform)
                .map_err(|e| runtime(e.into()))?;
            if slot == 0 {
                first = found;
            }
        }
        Ok::<_, Failure>((first, kept))
    };
    // Warm-up: cuDNN's algorithm search, and the CUDA graph's capture.
    let mut found = Vec::new();
    for _ in 0..50 {
        let (detections, _) = detect(false)?;
        let (on_gpu, kept) = detect(true)?;
        if on_gpu != detections {
            return Err(runtime(anyhow!(
                "decoding on the GPU found {on_gpu:?}, on the host {detections:?}"
            )));
        }
        found = detections;
        rows_kept = kept;
    }
    // Decoding on the GPU (the session's default where it can), then
    // with every output brought back and decoded on the host.
    let mut timed = |session_decodes_on_gpu: bool| {
        let mut samples = Vec::with_capacity(args.iters);
        for _ in 0..args.iters {
            let t0 = Instant::now();
            let detections = detect(session_decodes_on_gpu)?;
            samples.push(t0.elapsed().as_secs_f64() * 1e6);
            std::hint::black_box(detections);
        }
        Ok::<_, Failure>(samples)
    };
    let mut end_to_end = timed(true)?;
    let mut host_decoded = timed(false)?;

    // Inference alone, and from a host tensor (what a bare session.run
    // in another program is given), on sessions of their own.
    let engine = detector.engine();
    let mut device = match engine.new_device_session() {
        Some(session) => session.map_err(|e| runtime(e.into()))?,
        None => return Err(runtime(anyhow!("no device session"))),
    };
    let mut run_alone = |plan: Option<_>| {
        let asked = plan.is_some();
        let gathers = device.gather_rows(plan).map_err(|e| runtime(e.into()))?;
        if asked && !gathers {
            println!(
                "  (this session cannot gather rows: \"kept rows out\" below is whole outputs)"
            );
        }
        let mut samples = Vec::with_capacity(args.iters);
        for i in 0..args.iters + 50 {
            let t0 = Instant::now();
            device.run_on_device(batch).map_err(|e| runtime(e.into()))?;
            if i >= 50 {
                samples.push(t0.elapsed().as_secs_f64() * 1e6);
            }
        }
        Ok::<_, Failure>(samples)
    };
    let mut inference_gathered = run_alone(detector.gather_plan())?;
    let mut inference = run_alone(None)?;
    let mut host = engine.new_session().map_err(|e| runtime(e.into()))?;
    let spec = detector.preprocess_spec().clone();
    let mut tensor = vec![0f32; spec.tensor_len()];
    preprocess_into(frame, &spec, &mut tensor).map_err(|e| runtime(e.into()))?;
    let tensors = tensor.repeat(batch);
    let mut host_run = Vec::with_capacity(args.iters);
    for i in 0..args.iters + 50 {
        let t0 = Instant::now();
        host.run(InputBatch::host(&tensors, batch))
            .map_err(|e| runtime(e.into()))?;
        if i >= 50 {
            host_run.push(t0.elapsed().as_secs_f64() * 1e6);
        }
    }

    // The same frame on the CPU (tract), for agreement: raw outputs of
    // one tensor on each path, then detections.
    let cpu_engine = backend::open_engine(backend::BackendKind::Tract, model, &options)
        .map_err(|e| Failure::BadInput(e.into()))?;
    let mut tract = cpu_engine.new_session().map_err(|e| runtime(e.into()))?;
    tract
        .run(InputBatch::host(&tensor, 1))
        .map_err(|e| runtime(e.into()))?;
    if let Some(mut input) = device.input_image(0) {
        gpu.stream()
            .memcpy_htod(&tensor, &mut input)
            .map_err(cuda)?;
    }
    device.run_on_device(1).map_err(|e| runtime(e.into()))?;
    host.run(InputBatch::host(&tensor, 1))
        .map_err(|e| runtime(e.into()))?;
    let max_diff = |outputs: Vec<&[f32]>| {
        outputs
            .iter()
            .zip(tract.outputs().for_image(0))
            .flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs()))
            .fold(0f32, f32::max)
    };
    println!(
        "  raw outputs against tract on the same tensor: device session max abs diff {:.5}, host session {:.5}",
        max_diff(device.outputs().for_image(0)),
        max_diff(host.outputs().for_image(0))
    );
    let cpu = Arc::new(
        Detector::new(cpu_engine, &LayoutOverrides::default(), None, params)
            .map_err(|e| Failure::BadInput(e.into()))?,
    );
    let converted = to_frame(&layout, bytes, "bench").map_err(|e| runtime(e.into()))?;
    let want = cpu
        .session()
        .and_then(|mut s| s.detect(&converted))
        .map_err(|e| runtime(e.into()))?;
    let mut worst_score = 0f32;
    let mut worst_box = 0f32;
    for (g, c) in found.iter().zip(&want) {
        worst_score = worst_score.max((g.score - c.score).abs());
        for (a, b) in g.bbox.iter().zip(&c.bbox) {
            worst_box = worst_box.max((a - b).abs());
        }
    }
    let same_classes = found.len() == want.len()
        && found
            .iter()
            .zip(&want)
            .all(|(g, c)| g.class_id == c.class_id);
    println!(
        "  detections: GPU {} / CPU (tract) {}, same classes in order: {same_classes}; worst score diff {worst_score:.4}, worst box diff {worst_box:.2} px",
        found.len(),
        want.len()
    );
    println!(
        "  rows the GPU kept for the first frame: {}",
        rows_kept.map_or("none (the whole outputs came back)".to_owned(), |n| n
            .to_string())
    );
    println!(
        "  {:<44} {:>10} {:>10} {:>10}",
        format!("detector on the GPU, {batch} frame(s) a run"),
        "median µs",
        "p99 µs",
        "frames/s"
    );
    let rows: [(&str, &mut Vec<f64>); 5] = [
        (
            "pinned frames -> detections in host memory",
            &mut end_to_end,
        ),
        (
            "the same, every output decoded on the host",
            &mut host_decoded,
        ),
        (
            "inference alone (device in, kept rows out)",
            &mut inference_gathered,
        ),
        (
            "inference alone (device in, outputs to host)",
            &mut inference,
        ),
        (
            "host tensors -> outputs (session.run's work)",
            &mut host_run,
        ),
    ];
    for (name, samples) in rows {
        let (median, p99) = quantiles_us(samples);
        let rate = batch as f64 * 1e6 / median.max(f64::MIN_POSITIVE);
        println!("  {name:<44} {median:>10.1} {p99:>10.1} {rate:>10.0}");
    }
    Ok(())
}
