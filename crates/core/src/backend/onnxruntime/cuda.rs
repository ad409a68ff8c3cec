//! ONNX Runtime's CUDA (or TensorRT) provider with its input and outputs
//! bound to device memory that never moves, on nanodetd's own stream.
//!
//! Every tensor bound is one ONNX Runtime's device allocator made: an
//! input made elsewhere (a cudarc buffer, or a tensor over another
//! tensor's memory) is copied by ONNX Runtime once, when it is bound, and
//! every run then reads that first snapshot (measured on the H200, and
//! for views over the allocator's own memory on the H100).
//!
//! Every run is at the session's `max_batch`, whatever the number of
//! images in it: the images fill the first slots, the rest hold what they
//! held, and only the first images' outputs are read. Since cuDNN 9, ONNX
//! Runtime's Conv keeps the cuDNN plan of the last input shape only, and
//! rebuilds every Conv's plan on the CPU when the shape changes, even to
//! one it has seen (onnxruntime `conv.cc`, `UpdateState`; issue #23006).
//! That is what a session of one tensor set per power of two met on an
//! H100 (issue 21): runs of varying batch sizes took 1 to 3 s each, the
//! GPU idle, while runs at one size took 4.4 ms (32) and 1 ms (1). One
//! shape also means one CUDA graph, the configuration that runs; several
//! graph ids in one session faulted there. A run of 32 costs 4.4 ms where
//! a run of 1 costs 1 ms: `max_batch` is chosen for the load.
//!
//! Nothing runs here: ONNX Runtime keeps a CUDA graph, and its count of
//! runs before the capture, per thread, so the detector thread's own first
//! runs do that. After a run the outputs (or the rows the row gather
//! keeps) are copied into pinned host memory on the same stream. Fixed
//! addresses are what lets ONNX Runtime capture a run in a CUDA graph and
//! replay it.

use std::mem::ManuallyDrop;
use std::sync::Arc;

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaSlice, CudaViewMut, PinnedHostSlice};
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{IoBinding, RunOptions, Session as OrtSession};
use ort::value::Tensor;

use super::{OnnxRuntimeEngine, batch_shape, failed, unavailable};
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

/// The tensors, binding and run options of the session's one shape.
struct Bucket {
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
    // Fields drop in this order. The bucket's tensors go before the
    // allocator that made them (ONNX Runtime frees them through it) and
    // both before the session they belong to; the run was a segfault at
    // exit before. `None` only while the session is made.
    bucket: Option<Bucket>,
    allocator: Allocator,
    session: OrtSession,
    outputs: Vec<OutputBuffer>,
    /// A view of the bucket's input: ONNX Runtime frees it.
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
            bucket: None,
            allocator,
            session,
            outputs,
            // Replaced below by the bucket's input.
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
        };
        let fail = |e: BackendError| match e {
            BackendError::Run(cause) => unavailable(cause),
            other => other,
        };
        let bucket = made.make_bucket(max_batch).map_err(fail)?;
        let address = bucket.input;
        made.bucket = Some(bucket);
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

    /// Makes the tensors and binding for runs of `images` images.
    fn make_bucket(&self, images: usize) -> Result<Bucket, BackendError> {
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
            // The session's one graph.
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
        Ok(Bucket {
            binding,
            options,
            _input_tensor: input_tensor,
            input,
            outputs,
        })
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
        let stream = self.gpu.stream().clone();
        if !self.shares_stream {
            stream
                .synchronize()
                .map_err(driver("waiting for the input"))?;
        }
        let bucket = self.bucket.as_ref().ok_or(BackendError::HandedBack)?;
        self.session
            .run_binding_with_options(&bucket.binding, &bucket.options)
            .map_err(|e: ort::Error| BackendError::run(e))?;
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
