//! ONNX Runtime's CUDA (or TensorRT) provider with its input and outputs
//! bound to device memory that never moves, on nanodetd's own stream.
//!
//! Every tensor bound is one ONNX Runtime's device allocator made: an
//! input made elsewhere (a cudarc buffer, or a tensor over another
//! tensor's memory) is copied by ONNX Runtime once, when it is bound, and
//! every run then reads that first snapshot (measured on the H200, and
//! for views over the allocator's own memory on the H100). So each batch
//! size a run is made at has its own tensors, binding and CUDA graph
//! (`gpu_graph_id`): a bucket. Buckets are powers of two up to the
//! session's `max_batch`, all made when the session is made, none after a
//! run. A session of more than one bucket runs without CUDA graphs: with
//! several captured, ONNX Runtime 1.31.1's runs faulted on an H100 (see
//! `OnnxRuntimeEngine::graphs`). Nothing runs here: ONNX Runtime keeps a
//! CUDA graph, and its count of runs before the capture, per thread, so
//! the detector thread's own first runs do that. A session of several
//! buckets runs each once before its first real run, on that thread
//! (`warm_buckets`): in the daemon, runs of a batching session whose
//! sizes had only been warmed on the loader's thread took 1 to 3 s each
//! at 4 to 64 cameras (H100, issue 21; the cause is not known, and this
//! has not run on a GPU yet). The GPU preprocessor writes
//! every image into the largest bucket's input; a run of fewer images
//! copies them (device to device, microseconds) into the smallest bucket
//! that holds them and runs that, its spare images ignored. After a run
//! the outputs are copied into pinned host memory on the same stream.
//! Fixed addresses are what lets ONNX Runtime capture a run in a CUDA
//! graph and replay it.

use std::mem::ManuallyDrop;
use std::sync::Arc;

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaSlice, CudaViewMut, PinnedHostSlice};
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{IoBinding, RunOptions, Session as OrtSession};
use ort::value::Tensor;

use super::{OnnxRuntimeEngine, batch_shape, bucket_for, bucket_sizes, failed, unavailable};
use crate::backend::gather::RowGather;
use crate::backend::{BackendError, BatchOutputs, DeviceSession, GatherPlan, InputBatch, Session};
use crate::gpu::{Gpu, GpuError};

/// One output: its shape and size for one image, and where the host
/// reads it.
struct OutputBuffer {
    name: String,
    shape: Vec<usize>,
    per_image: usize,
    host: PinnedHostSlice<f32>,
}

/// The tensors, binding and run options of one batch size.
struct Bucket {
    images: usize,
    // Drops before the tensor: the binding holds it too.
    binding: IoBinding,
    options: RunOptions,
    _input_tensor: Tensor<f32>,
    input: CUdeviceptr,
    /// Each output's memory, in the engine's order (the binding owns the
    /// tensors).
    outputs: Vec<CUdeviceptr>,
}

/// A session on the GPU that runs up to `max_batch` images at once.
pub(super) struct CudaSession {
    // Fields drop in this order. The buckets' tensors go before the
    // allocator that made them (ONNX Runtime frees them through it) and
    // both before the session they belong to; the run was a segfault at
    // exit before.
    buckets: Vec<Bucket>,
    allocator: Allocator,
    session: OrtSession,
    outputs: Vec<OutputBuffer>,
    /// A view of the largest bucket's input: ONNX Runtime frees it.
    input: ManuallyDrop<CudaSlice<f32>>,
    input_name: String,
    gpu: Arc<Gpu>,
    /// Whether the provider runs on the GPU's stream (CUDA's does; the
    /// TensorRT provider's has its own, so the input is synced first).
    shares_stream: bool,
    /// Whether the provider replays CUDA graphs (the run skips its sync).
    graphs: bool,
    image_shape: Vec<usize>,
    per_image: usize,
    max_batch: usize,
    results: BatchOutputs,
    /// Set: runs on the device bring back only the rows it keeps.
    gather: Option<RowGather>,
    /// Whether every bucket has run once, on the thread that runs them.
    warmed: bool,
}

fn driver(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> BackendError {
    move |e| BackendError::run(GpuError::driver(what)(e))
}

impl CudaSession {
    #[allow(unsafe_code)]
    pub(super) fn new(
        session: OrtSession,
        engine: &OnnxRuntimeEngine,
        gpu: Arc<Gpu>,
    ) -> Result<CudaSession, BackendError> {
        let error = failed("binding device buffers");
        let cuda = |what: &'static str| {
            move |e: cudarc::driver::DriverError| unavailable(GpuError::driver(what)(e))
        };
        let device = i32::try_from(engine.options.device).unwrap_or(0);
        let on_device = MemoryInfo::new(
            AllocationDevice::CUDA,
            device,
            AllocatorType::Device,
            MemoryType::Default,
        )
        .map_err(&error)?;
        let max_batch = engine.max_batch.max(1);
        let per_image: usize = engine.info.input.shape.iter().product();
        let allocator = Allocator::new(&session, on_device).map_err(&error)?;
        let mut outputs = Vec::new();
        for output in &engine.info.outputs {
            let per_image: usize = output.shape.iter().product();
            // SAFETY: only read after a device-to-host copy fills it. Not
            // write-combined: the CPU reads it.
            let host = unsafe {
                gpu.context()
                    .alloc_pinned_with_flags::<f32>(max_batch * per_image, 0)
            }
            .map_err(cuda("allocating pinned output memory"))?;
            outputs.push(OutputBuffer {
                name: output.name.clone(),
                shape: output.shape.clone(),
                per_image,
                host,
            });
        }
        let mut made = CudaSession {
            buckets: Vec::new(),
            allocator,
            session,
            outputs,
            // Replaced below by the largest bucket's input.
            input: ManuallyDrop::new(gpu.stream().null().map_err(cuda("an empty view"))?),
            input_name: engine.input_name.clone(),
            gpu,
            // The CUDA provider runs on nanodetd's stream, so the copies to
            // the host follow it there and one sync after them does for
            // both. The TensorRT provider has a stream of its own: the run
            // syncs.
            shares_stream: engine.provider == super::Provider::Cuda,
            graphs: engine.graphs(),
            image_shape: engine.info.input.shape.clone(),
            per_image,
            max_batch,
            results: BatchOutputs::default(),
            gather: None,
            // One bucket: its first run is the only first run there is.
            warmed: bucket_sizes(max_batch).len() <= 1,
        };
        let fail = |e: BackendError| match e {
            BackendError::Run(cause) => unavailable(cause),
            other => other,
        };
        let started = std::time::Instant::now();
        for images in bucket_sizes(max_batch) {
            made.bucket(images).map_err(fail)?;
        }
        log::info!(
            "ONNX Runtime CUDA session: buffers for batch sizes {:?} made in {:.1} s",
            bucket_sizes(max_batch),
            started.elapsed().as_secs_f64()
        );
        let largest = made.buckets.len() - 1;
        let address = made.buckets[largest].input;
        // SAFETY: ONNX Runtime allocated `max_batch * per_image` f32 on
        // this device at `address`; the bucket that owns them lives as long
        // as the session, and the view is leaked, never freed, on drop.
        let view = unsafe {
            made.gpu
                .stream()
                .upgrade_device_ptr::<f32>(address, max_batch * per_image)
        };
        let empty = std::mem::replace(&mut made.input, ManuallyDrop::new(view));
        ManuallyDrop::into_inner(empty).leak();
        Ok(made)
    }

    /// One run of bucket `index` on what its input holds.
    fn run_bucket(&mut self, index: usize) -> Result<(), BackendError> {
        let bucket = self.buckets.get(index).ok_or(BackendError::HandedBack)?;
        self.session
            .run_binding_with_options(&bucket.binding, &bucket.options)
            .map_err(|e: ort::Error| BackendError::run(e))?;
        Ok(())
    }

    /// Runs every bucket once, on what their inputs hold, before the
    /// first real run: on the thread that runs them, so whatever ONNX
    /// Runtime and cuDNN set up per batch size, and per thread, is set up
    /// once here and not at the first batch of each size in service. The
    /// largest bucket's input, which the preprocessor has just filled, is
    /// only read.
    fn warm_buckets(&mut self) {
        let started = std::time::Instant::now();
        // Once, whatever happens: a bucket that fails here is the run's to
        // report when a batch needs it, not every batch's.
        self.warmed = true;
        for index in 0..self.buckets.len() {
            if let Err(e) = self.run_bucket(index) {
                let size = self.buckets.get(index).map_or(0, |b| b.images);
                log::warn!("ONNX Runtime CUDA session: warming batch size {size} up failed: {e}");
            }
        }
        log::info!(
            "ONNX Runtime CUDA session: batch sizes {:?} run once on the detector's thread in {:.1} s",
            bucket_sizes(self.max_batch),
            started.elapsed().as_secs_f64()
        );
    }

    /// Makes the bucket of `images` images.
    fn bucket(&mut self, images: usize) -> Result<(), BackendError> {
        let error = |e: ort::Error| BackendError::run(e);
        let mut binding = self.session.create_binding().map_err(error)?;
        let mut input_tensor = Tensor::<f32>::new(
            &self.allocator,
            batch_shape(&self.image_shape, images).as_slice(),
        )
        .map_err(error)?;
        let input = input_tensor.data_ptr_mut() as CUdeviceptr;
        binding
            .bind_input(self.input_name.as_str(), &input_tensor)
            .map_err(error)?;
        let mut outputs = Vec::with_capacity(self.outputs.len());
        for output in &self.outputs {
            let tensor = Tensor::<f32>::new(
                &self.allocator,
                batch_shape(&output.shape, images).as_slice(),
            )
            .map_err(error)?;
            outputs.push(tensor.data_ptr() as CUdeviceptr);
            binding
                .bind_output(output.name.as_str(), tensor)
                .map_err(error)?;
        }
        let mut options = RunOptions::new().map_err(error)?;
        if self.graphs && self.shares_stream {
            // One graph per bucket: each has its own shapes and buffers.
            options
                .set("gpu_graph_id", images.to_string())
                .map_err(error)?;
            // Without the CUDA graph, ONNX Runtime's kernels park small
            // pinned host buffers on the stream and free them when the run
            // ends with a sync. Skipping that sync left them to ONNX
            // Runtime's teardown, after CUDA's own: an abort at exit
            // (cudaFreeHost, error 800, on the H200). A replayed graph parks
            // nothing, so only it skips the sync; the fallback pays for it
            // (2.6 -> 3.7 ms a frame there).
            options.disable_device_sync().map_err(error)?;
        }
        self.buckets.push(Bucket {
            images,
            binding,
            options,
            _input_tensor: input_tensor,
            input,
            outputs,
        });
        Ok(())
    }

    /// Runs the first `images` images of the input buffer and copies their
    /// outputs to the pinned host buffers, or only the rows the row
    /// gather keeps when there is one and `gather` is set.
    #[allow(unsafe_code)]
    fn run_images(&mut self, images: usize, gather: bool) -> Result<(), BackendError> {
        if images == 0 || images > self.max_batch {
            return Err(BackendError::Input {
                images,
                values: images.saturating_mul(self.per_image),
                reason: format!("this session takes 1 to {} images", self.max_batch),
            });
        }
        if !self.warmed {
            self.warm_buckets();
        }
        let stream = self.gpu.stream().clone();
        let size = bucket_for(images, self.max_batch);
        let index = self
            .buckets
            .iter()
            .position(|b| b.images == size)
            .ok_or(BackendError::HandedBack)?;
        let bucket = &self.buckets[index];
        if bucket.images != self.max_batch {
            let copy = driver("copying the batch into its bucket");
            let (from, _) = cudarc::driver::DevicePtr::device_ptr(&*self.input, &stream);
            // SAFETY: both buffers hold at least `images` images of
            // `per_image` f32 (the largest bucket's and this one's inputs),
            // and are not freed while the session lives.
            unsafe {
                cudarc::driver::result::memcpy_dtod_async(
                    bucket.input,
                    from,
                    images * self.per_image * size_of::<f32>(),
                    stream.cu_stream(),
                )
            }
            .map_err(copy)?;
        }
        if !self.shares_stream {
            stream
                .synchronize()
                .map_err(driver("waiting for the input"))?;
        }
        self.run_bucket(index)?;
        let bucket = &self.buckets[index];
        if gather && let Some(rows) = &mut self.gather {
            let output = bucket.outputs.get(rows.plan().output).copied();
            let output = output.ok_or(BackendError::HandedBack)?;
            if rows.gather(output, images, &mut self.results)? {
                return Ok(());
            }
        }
        let copy = driver("copying outputs to the host");
        for (output, &device) in self.outputs.iter_mut().zip(&bucket.outputs) {
            let len = images * output.per_image;
            let host = output.host.as_mut_slice().map_err(&copy)?;
            // SAFETY: `device` is the bucket's output tensor, which holds
            // at least `len` values; the bucket's binding holds it.
            unsafe {
                cudarc::driver::result::memcpy_dtoh_async(
                    &mut host[..len],
                    device,
                    stream.cu_stream(),
                )
            }
            .map_err(&copy)?;
        }
        stream.synchronize().map_err(copy)?;
        self.results.reset(self.outputs.len(), images);
        let copy = driver("reading the outputs");
        for (index, output) in self.outputs.iter().enumerate() {
            let values = output.host.as_slice().map_err(&copy)?;
            self.results
                .push(index, &values[..images * output.per_image]);
        }
        Ok(())
    }
}

impl Drop for CudaSession {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        // SAFETY: taken once, here; the memory belongs to ONNX Runtime's
        // tensor, so the view lets it go without freeing it.
        let view = unsafe { ManuallyDrop::take(&mut self.input) };
        view.leak();
    }
}

impl DeviceSession for CudaSession {
    fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    fn max_images(&self) -> usize {
        self.max_batch
    }

    fn input_image(&mut self, index: usize) -> Option<CudaViewMut<'_, f32>> {
        let per_image = self.per_image;
        (index < self.max_batch).then(|| {
            self.input
                .slice_mut(index * per_image..(index + 1) * per_image)
        })
    }

    fn run_on_device(&mut self, images: usize) -> Result<(), BackendError> {
        self.run_images(images, true)
    }

    fn gather_rows(&mut self, plan: Option<GatherPlan>) -> Result<bool, BackendError> {
        let outputs = &self.outputs;
        RowGather::replan(
            &mut self.gather,
            plan,
            |index| outputs.get(index).map(|o| o.per_image),
            &self.gpu,
            self.max_batch,
        )
    }

    fn outputs(&self) -> &BatchOutputs {
        &self.results
    }
}

impl Session for CudaSession {
    fn run(&mut self, batch: InputBatch<'_>) -> Result<(), BackendError> {
        batch.check(&self.image_shape, usize::MAX)?;
        // Runs of up to max_batch images; the outputs of all of them.
        let mut all = BatchOutputs::default();
        all.reset(self.outputs.len(), batch.images);
        let stream = self.gpu.stream().clone();
        for images in batch.data.chunks(self.per_image * self.max_batch) {
            let count = images.len() / self.per_image;
            let mut first = self.input.slice_mut(..images.len());
            stream
                .memcpy_htod(images, &mut first)
                .map_err(driver("copying the input"))?;
            self.run_images(count, false)?;
            for image in 0..count {
                for (index, values) in self.results.for_image(image).into_iter().enumerate() {
                    all.push(index, values);
                }
            }
        }
        self.results = all;
        Ok(())
    }

    fn outputs(&self) -> &BatchOutputs {
        &self.results
    }
}
