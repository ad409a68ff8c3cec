//! The GPU side of the ONNX Runtime backend: the device an engine's
//! sessions share, the stream the CUDA provider is handed, and the
//! session whose input and outputs are bound to device memory
//! (`cuda.rs`).
//!
//! This file is the one place where the `cuda` feature gates the backend.
//! Without it, [`SharedGpu`] and [`CudaSession`] are types with no values:
//! an engine never holds a device, so the code that would use one stays
//! whole and needs no cfg.

#[cfg(feature = "cuda")]
pub(super) use self::gpu::{CudaSession, SharedGpu, into_device_session, open, with_stream};
#[cfg(not(feature = "cuda"))]
pub(super) use self::host_only::{CudaSession, SharedGpu, into_device_session, open, with_stream};

#[cfg(feature = "cuda")]
mod gpu {
    use std::sync::Arc;

    pub(in crate::backend::onnxruntime) use super::super::cuda::CudaSession;
    use crate::backend::DeviceSessionBox;
    use crate::gpu::Gpu;

    /// The device an engine's sessions run on.
    pub type SharedGpu = Arc<Gpu>;

    /// The device `index`, shared: the provider is handed its stream, and
    /// ONNX Runtime needs that stream until the process exits.
    pub fn open(index: usize) -> Result<SharedGpu, String> {
        Gpu::shared(index).map_err(|e| e.to_string())
    }

    /// `cuda`, running on `gpu`'s stream.
    pub fn with_stream(cuda: ort::ep::CUDA, gpu: &SharedGpu) -> ort::ep::CUDA {
        #[allow(unsafe_code)]
        // SAFETY: the stream is the Gpu's, which every session of the
        // engine holds (an Arc) for as long as it lives.
        unsafe {
            cuda.with_compute_stream(gpu.stream().cu_stream().cast())
        }
    }

    /// `session` as the device session the GPU preprocessor feeds.
    pub fn into_device_session(session: CudaSession) -> DeviceSessionBox {
        Box::new(session)
    }
}

#[cfg(not(feature = "cuda"))]
mod host_only {
    use ort::session::Session as OrtSession;

    use super::super::OnnxRuntimeEngine;
    use crate::backend::{BackendError, BatchOutputs, DeviceSessionBox, InputBatch, Session};

    /// No device: this build has none to share.
    #[derive(Clone)]
    pub enum SharedGpu {}

    /// No session binds device memory in this build.
    pub enum CudaSession {}

    impl CudaSession {
        /// Never called: there is no [`SharedGpu`] to call it with.
        pub fn new(
            _: OrtSession,
            _: &OnnxRuntimeEngine,
            gpu: SharedGpu,
        ) -> Result<CudaSession, BackendError> {
            match gpu {}
        }
    }

    impl Session for CudaSession {
        fn run(&mut self, _: InputBatch<'_>) -> Result<(), BackendError> {
            match *self {}
        }

        fn outputs(&self) -> &BatchOutputs {
            match *self {}
        }
    }

    /// Why no GPU provider can run.
    pub fn open(_: usize) -> Result<SharedGpu, String> {
        Err("this nanodetd was built without feature `cuda`, which binds the provider's input and outputs to device memory".into())
    }

    pub fn with_stream(_: ort::ep::CUDA, gpu: &SharedGpu) -> ort::ep::CUDA {
        match *gpu {}
    }

    pub fn into_device_session(session: CudaSession) -> DeviceSessionBox {
        match session {}
    }
}
