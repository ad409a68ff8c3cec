//! ONNX Runtime's CUDA (or TensorRT) provider with its input and outputs
//! bound to device memory that never moves, on nanodetd's own stream.
//!
//! The input is a tensor from the session's device allocator, which the
//! GPU preprocessor writes into through a cudarc view of its memory. The
//! outputs are tensors from the same allocator, bound once;
//! after a run they are copied into pinned host memory on the same
//! stream. Fixed addresses are what lets ONNX Runtime capture the run in
//! a CUDA graph and replay it.

use std::mem::ManuallyDrop;
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaViewMut, PinnedHostSlice};
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{IoBinding, RunOptions, Session as OrtSession};
use ort::value::Tensor;

use super::{OnnxRuntimeEngine, failed, unavailable};
use crate::backend::{BackendError, BatchOutputs, DeviceSession, InputBatch, Session};
use crate::gpu::{Gpu, GpuError};

/// One output: where ONNX Runtime writes it, and where the host reads it.
struct OutputBuffer {
    device: cudarc::driver::sys::CUdeviceptr,
    host: PinnedHostSlice<f32>,
}

/// A batch-1 session on the GPU (NanoDet exports are batch 1; a host
/// batch runs image by image).
pub(super) struct CudaSession {
    // Fields drop in this order. The tensors go before the allocator
    // that made them (ONNX Runtime frees them through it) and both before
    // the session it belongs to; the run was a segfault at exit before.
    binding: IoBinding,
    _input_tensor: Tensor<f32>,
    _allocator: Allocator,
    run_options: RunOptions,
    session: OrtSession,
    outputs: Vec<OutputBuffer>,
    /// A view of `_input_tensor`'s memory: ONNX Runtime frees it.
    input: ManuallyDrop<CudaSlice<f32>>,
    gpu: Arc<Gpu>,
    /// Whether the provider runs on the GPU's stream (CUDA's does; the
    /// TensorRT provider's has its own, so the input is synced first).
    shares_stream: bool,
    image_shape: Vec<usize>,
    per_image: usize,
    results: BatchOutputs,
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
        let stream = gpu.stream().clone();
        let per_image: usize = engine.info.input.shape.iter().product();
        let mut binding = session.create_binding().map_err(&error)?;
        let allocator = Allocator::new(&session, on_device).map_err(&error)?;
        // The input comes from the session's own allocator, and the kernel
        // writes into it through a cudarc view of the same memory. An
        // input made elsewhere (a cudarc buffer wrapped as a tensor) is
        // copied by ONNX Runtime once, when it is bound, and every run then
        // reads that first snapshot: measured on the H200.
        let mut input_tensor =
            Tensor::<f32>::new(&allocator, engine.info.input.shape.as_slice()).map_err(&error)?;
        let address = input_tensor.data_ptr_mut() as cudarc::driver::sys::CUdeviceptr;
        // SAFETY: ONNX Runtime allocated `per_image` f32 on this device at
        // `address`; the tensor that owns them is kept (bound) for the
        // session's life, and the view is leaked, never freed, on drop.
        let input =
            ManuallyDrop::new(unsafe { stream.upgrade_device_ptr::<f32>(address, per_image) });
        binding
            .bind_input(engine.input_name.as_str(), &input_tensor)
            .map_err(&error)?;
        let mut outputs = Vec::new();
        for output in &engine.info.outputs {
            let len: usize = output.shape.iter().product();
            let tensor = Tensor::<f32>::new(&allocator, output.shape.as_slice()).map_err(&error)?;
            let device = tensor.data_ptr() as cudarc::driver::sys::CUdeviceptr;
            binding
                .bind_output(output.name.as_str(), tensor)
                .map_err(&error)?;
            // SAFETY: only read after a device-to-host copy fills it. Not
            // write-combined: the CPU reads it.
            let host = unsafe { gpu.context().alloc_pinned_with_flags::<f32>(len, 0) }
                .map_err(cuda("allocating pinned output memory"))?;
            outputs.push(OutputBuffer { device, host });
        }
        let mut run_options = RunOptions::new().map_err(&error)?;
        // The CUDA provider runs on nanodetd's stream, so the copies to the
        // host follow it there and one sync after them does for both. The
        // TensorRT provider has a stream of its own: the run syncs.
        let shares_stream = engine.provider == super::Provider::Cuda;
        // Without the CUDA graph, ONNX Runtime's kernels park small pinned
        // host buffers on the stream and free them when the run ends with
        // a sync. Skipping that sync left them to ONNX Runtime's teardown,
        // after CUDA's own: an abort at exit (cudaFreeHost, error 800, on
        // the H200). A replayed graph parks nothing, so only it skips the
        // sync; the fallback pays for it (2.6 -> 3.7 ms a frame there).
        if shares_stream && engine.options.cuda_graph {
            run_options.disable_device_sync().map_err(&error)?;
        }
        Ok(CudaSession {
            binding,
            _input_tensor: input_tensor,
            _allocator: allocator,
            run_options,
            session,
            outputs,
            input,
            gpu,
            shares_stream,
            image_shape: engine.info.input.shape.clone(),
            per_image,
            results: BatchOutputs::default(),
        })
    }

    /// Runs the image in the input buffer and copies the outputs to the
    /// pinned host buffers.
    #[allow(unsafe_code)]
    fn run_image(&mut self) -> Result<(), BackendError> {
        let stream = self.gpu.stream().clone();
        if !self.shares_stream {
            stream
                .synchronize()
                .map_err(driver("waiting for the input"))?;
        }
        self.session
            .run_binding_with_options(&self.binding, &self.run_options)
            .map_err(|e: ort::Error| BackendError::run(e))?;
        let copy = driver("copying outputs to the host");
        for output in &mut self.outputs {
            let host = output.host.as_mut_slice().map_err(&copy)?;
            // SAFETY: `device` is the output tensor ONNX Runtime allocated
            // with `host.len()` elements; the binding holds it.
            unsafe {
                cudarc::driver::result::memcpy_dtoh_async(host, output.device, stream.cu_stream())
            }
            .map_err(&copy)?;
        }
        stream.synchronize().map_err(copy)
    }

    fn push_outputs(&mut self) -> Result<(), BackendError> {
        let copy = driver("reading the outputs");
        for (index, output) in self.outputs.iter().enumerate() {
            self.results
                .push(index, output.host.as_slice().map_err(&copy)?);
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
        1
    }

    fn input_image(&mut self, index: usize) -> Option<CudaViewMut<'_, f32>> {
        (index == 0).then(|| self.input.slice_mut(..))
    }

    fn run_on_device(&mut self, images: usize) -> Result<(), BackendError> {
        if images != 1 {
            return Err(BackendError::Input {
                images,
                values: images * self.per_image,
                reason: "the device buffers hold one image".into(),
            });
        }
        self.run_image()?;
        self.results.reset(self.outputs.len(), 1);
        self.push_outputs()
    }

    fn outputs(&self) -> &BatchOutputs {
        &self.results
    }
}

impl Session for CudaSession {
    fn run(&mut self, batch: InputBatch<'_>) -> Result<(), BackendError> {
        batch.check(&self.image_shape, usize::MAX)?;
        self.results.reset(self.outputs.len(), batch.images);
        let stream = self.gpu.stream().clone();
        for image in batch.data.chunks_exact(self.per_image) {
            stream
                .memcpy_htod(image, &mut *self.input)
                .map_err(driver("copying the input"))?;
            self.run_image()?;
            self.push_outputs()?;
        }
        Ok(())
    }

    fn outputs(&self) -> &BatchOutputs {
        &self.results
    }
}
