//! The CUDA device, found at run time and never linked: cudarc loads
//! `libcuda` and `libnvrtc` with dlopen, so a binary built with the `cuda`
//! feature still starts on a machine without them and takes the CPU path.
//!
//! cudarc panics when a library it needs is missing, so every entry point
//! here asks `is_culib_present()` first and turns absence into a
//! [`GpuError`] the caller can log and fall back from.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use cudarc::driver::{CudaContext, CudaFunction, CudaStream, DriverError};
use cudarc::nvrtc::CompileOptions;

use crate::buffer::CaptureBuffer;

/// Why the GPU path is not available, or a GPU operation failed.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// No NVIDIA driver library on this machine.
    #[error(
        "no CUDA driver library (libcuda.so.1) could be loaded: no NVIDIA driver on this machine"
    )]
    NoDriver,
    /// No NVRTC, so kernels cannot be compiled.
    #[error(
        "no NVRTC library (libnvrtc.so) could be loaded; install the CUDA runtime (JetPack ships it) or add its lib directory to LD_LIBRARY_PATH"
    )]
    NoNvrtc,
    /// A driver call failed.
    #[error("CUDA {what}: {source}")]
    Driver {
        /// What was being done.
        what: &'static str,
        /// The driver's error.
        source: DriverError,
    },
    /// NVRTC rejected a kernel.
    #[error("compiling the {kernel} kernel: {log}")]
    Compile {
        /// The kernel's name.
        kernel: &'static str,
        /// NVRTC's message and log.
        log: String,
    },
}

impl GpuError {
    /// Wraps a driver error with what was being done.
    pub fn driver(what: &'static str) -> impl FnOnce(DriverError) -> GpuError {
        move |source| GpuError::Driver { what, source }
    }
}

/// One CUDA device with the stream nanodetd's work on it is ordered by.
pub struct Gpu {
    context: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// Frames uploaded ahead of their run go on their own stream, so the
    /// copies overlap the run before (issue 21). cudarc's event tracking
    /// orders the two: a kernel waits for its frame's upload, an upload
    /// for the last kernel that read its buffer.
    uploads: Arc<CudaStream>,
    name: String,
    compute_capability: (i32, i32),
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("ordinal", &self.context.ordinal())
            .field("name", &self.name)
            .field("compute_capability", &self.compute_capability)
            .finish()
    }
}

impl Gpu {
    /// Opens device `ordinal`, or says why there is none.
    #[allow(unsafe_code)]
    pub fn open(ordinal: usize) -> Result<Gpu, GpuError> {
        // SAFETY: only tries to dlopen the driver library; it calls nothing
        // in it.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(GpuError::NoDriver);
        }
        let context = CudaContext::new(ordinal).map_err(GpuError::driver("opening the device"))?;
        let stream = context
            .new_stream()
            .map_err(GpuError::driver("creating a stream"))?;
        let uploads = context
            .new_stream()
            .map_err(GpuError::driver("creating the upload stream"))?;
        let name = context
            .name()
            .map_err(GpuError::driver("reading the device name"))?;
        let compute_capability = context
            .compute_capability()
            .map_err(GpuError::driver("reading the compute capability"))?;
        Ok(Gpu {
            context,
            stream,
            uploads,
            name,
            compute_capability,
        })
    }

    /// The process's one [`Gpu`] for device `ordinal`, opened on first
    /// use and never closed. Inference runtimes that are handed its stream
    /// (ONNX Runtime's CUDA provider) keep using it in per-thread state
    /// until the process exits, so a stream that closed with the engine
    /// that opened it would be used after it was destroyed.
    pub fn shared(ordinal: usize) -> Result<Arc<Gpu>, GpuError> {
        static OPENED: Mutex<BTreeMap<usize, Arc<Gpu>>> = Mutex::new(BTreeMap::new());
        let mut opened = OPENED.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(gpu) = opened.get(&ordinal) {
            return Ok(gpu.clone());
        }
        let gpu = Arc::new(Gpu::open(ordinal)?);
        opened.insert(ordinal, gpu.clone());
        Ok(gpu)
    }

    /// The device's name, as the driver reports it ("NVIDIA H200",
    /// "Orin").
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Compute capability `(major, minor)`.
    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }

    /// The CUDA context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.context
    }

    /// The stream that orders copies, kernels and inference.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The stream of frames uploaded ahead of their run.
    pub fn uploads(&self) -> &Arc<CudaStream> {
        &self.uploads
    }

    /// Page-locks a capture buffer for this device, once (later calls
    /// return at once): uploads from it then go by DMA with no staging
    /// copy. The registration rides on the buffer and ends before its
    /// memory is unmapped.
    #[allow(unsafe_code)]
    pub fn pin_capture_buffer(&self, buffer: &CaptureBuffer) -> Result<(), GpuError> {
        if buffer.is_pinned() || buffer.is_empty() {
            return Ok(());
        }
        self.context
            .bind_to_thread()
            .map_err(GpuError::driver("binding the context"))?;
        let start = buffer.as_ptr().cast_mut().cast::<std::ffi::c_void>();
        // SAFETY: `start` and `len` describe one live anonymous mapping
        // owned by `buffer`, which drops the registration (below) before
        // unmapping it.
        unsafe { cudarc::driver::sys::cuMemHostRegister_v2(start, buffer.len(), 0) }
            .result()
            .map_err(GpuError::driver("page-locking a capture buffer"))?;
        buffer.attach_pin(Box::new(HostRegistration {
            context: Arc::clone(&self.context),
            start: start as usize,
        }));
        Ok(())
    }

    /// Compiles `source` with NVRTC for this device and returns its
    /// function `kernel`.
    #[allow(unsafe_code)]
    pub fn compile(&self, kernel: &'static str, source: &str) -> Result<CudaFunction, GpuError> {
        // SAFETY: only tries to dlopen NVRTC.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(GpuError::NoNvrtc);
        }
        let (major, minor) = self.compute_capability;
        let options = CompileOptions {
            // For this device's own architecture: NVRTC's default target
            // is dropped by newer toolkits, and PTX for the exact device
            // needs no further JIT choices.
            options: vec![format!("--gpu-architecture=compute_{major}{minor}")],
            ..CompileOptions::default()
        };
        let ptx = cudarc::nvrtc::compile_ptx_with_opts(source, options).map_err(|e| {
            GpuError::Compile {
                kernel,
                log: format!("{e:?}"),
            }
        })?;
        let module = self
            .context
            .load_module(ptx)
            .map_err(GpuError::driver("loading a compiled kernel"))?;
        module
            .load_function(kernel)
            .map_err(GpuError::driver("finding a kernel in its module"))
    }
}

/// A host range page-locked by [`Gpu::pin_capture_buffer`]; unregistered
/// on drop. The address is kept as a number so the registration is Send.
struct HostRegistration {
    context: Arc<CudaContext>,
    start: usize,
}

impl Drop for HostRegistration {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        // Unregistering needs the context current on this thread (a
        // camera thread, when a ring goes with its stream).
        let unregistered = self.context.bind_to_thread().and_then(|()| {
            // SAFETY: `start` was registered by pin_capture_buffer, and its
            // mapping is still there (CaptureBuffer drops pins first).
            unsafe { cudarc::driver::sys::cuMemHostUnregister(self.start as *mut std::ffi::c_void) }
                .result()
        });
        if let Err(e) = unregistered {
            log::debug!("unregistering a capture buffer: {e}");
        }
    }
}

/// Stream work replayed from a CUDA graph, for work that launches many
/// small kernels (an inference engine at batch 1), where launching costs
/// about as much as computing.
///
/// The first run of a shape runs plainly, so the work can finish any
/// lazy setup (TensorRT allocates on its first enqueue); the second is
/// captured into a graph and launched; later runs only launch it. Each
/// shape keeps its own graph, so batches of changing sizes replay without
/// capturing again. Work that cannot be captured (it syncs, or allocates,
/// inside) runs plainly for that shape from then on, and
/// [`Self::not_replaying`] says why.
///
/// The work must do the same thing on every run of a shape, with the
/// same buffers: a graph replays the addresses it captured.
pub struct GraphReplay {
    stream: Arc<CudaStream>,
    /// Why nothing is captured, when capture is turned off.
    off: Option<String>,
    shapes: std::collections::BTreeMap<usize, ReplayState>,
}

// SAFETY: cudarc leaves `CudaGraph` !Send because it holds raw handles.
// A graph is owned by one `GraphReplay`, used through `&mut` from one
// thread at a time, and cudarc makes its context current on whichever
// thread launches it; CUDA allows launching an executable graph from any
// thread of the process.
#[allow(unsafe_code)]
unsafe impl Send for GraphReplay {}

enum ReplayState {
    /// The shape's first run is still to come.
    Cold,
    /// Ran once plainly: the next run is captured.
    Warm,
    /// Captured: runs launch this.
    Captured(cudarc::driver::CudaGraph),
    /// Capture is off, for this reason.
    Off(String),
}

impl GraphReplay {
    /// Replays on `stream`, or, with `enabled` false, always runs plainly.
    pub fn new(stream: Arc<CudaStream>, enabled: bool) -> GraphReplay {
        GraphReplay {
            stream,
            off: (!enabled).then(|| "turned off in the configuration".into()),
            shapes: std::collections::BTreeMap::new(),
        }
    }

    /// Runs `work` for `shape` (a batch size, say): plainly, captured, or
    /// from the graph. The caller syncs the stream when it needs results.
    pub fn run<E: From<GpuError> + std::fmt::Display>(
        &mut self,
        shape: usize,
        work: &mut dyn FnMut() -> Result<(), E>,
    ) -> Result<(), E> {
        if self.off.is_some() {
            return work();
        }
        let state = self.shapes.entry(shape).or_insert(ReplayState::Cold);
        match state {
            ReplayState::Off(_) => work(),
            ReplayState::Cold => {
                work()?;
                *state = ReplayState::Warm;
                Ok(())
            }
            ReplayState::Captured(graph) => Ok(graph
                .launch()
                .map_err(GpuError::driver("launching the CUDA graph"))?),
            ReplayState::Warm => match capture(&self.stream, work) {
                Ok(graph) => {
                    graph
                        .launch()
                        .map_err(GpuError::driver("launching the CUDA graph"))?;
                    *state = ReplayState::Captured(graph);
                    Ok(())
                }
                Err(why) => {
                    log::warn!(
                        "CUDA graph capture failed for shape {shape}, running it without: {why}"
                    );
                    *state = ReplayState::Off(why);
                    // What was captured did not run.
                    work()
                }
            },
        }
    }

    /// Why some runs are not replayed from a graph, when they are not:
    /// capture turned off, or the first shape that could not be captured.
    pub fn not_replaying(&self) -> Option<&str> {
        self.off.as_deref().or_else(|| {
            self.shapes.values().find_map(|state| match state {
                ReplayState::Off(why) => Some(why.as_str()),
                _ => None,
            })
        })
    }

    /// Whether the next run of `shape` launches a captured graph.
    pub fn replays(&self, shape: usize) -> bool {
        matches!(self.shapes.get(&shape), Some(ReplayState::Captured(_)))
    }
}

/// The graph of `work` on `stream`, or why it could not be captured
/// (kept as the reason that shape is not replayed).
fn capture<E: std::fmt::Display>(
    stream: &Arc<CudaStream>,
    work: &mut dyn FnMut() -> Result<(), E>,
) -> Result<cudarc::driver::CudaGraph, String> {
    use cudarc::driver::sys::CUstreamCaptureMode;
    // Thread-local: another thread's allocation (a camera's pinned buffer)
    // does not break this capture.
    stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .map_err(|e| format!("beginning the capture: {e}"))?;
    let captured = work();
    // Ended whatever happened, so the stream leaves capture mode.
    let graph = stream.end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0));
    captured.map_err(|e| format!("the work failed while captured: {e}"))?;
    graph
        .map_err(|e| format!("ending the capture: {e}"))?
        .ok_or_else(|| "the capture was empty".to_owned())
}
