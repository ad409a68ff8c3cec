//! Safe ownership of the shim's objects: the loaded library, built plans,
//! deserialized engines and execution contexts. Each Rust value frees its
//! C++ object once, and holds what that object needs alive (a context
//! holds its engine, an engine the library).

use std::ffi::{CStr, CString, c_char, c_void};
use std::fmt;
use std::ptr::NonNull;
use std::sync::Arc;

use super::ffi;

/// A TensorRT version, as `getInferLibVersion()` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct TrtVersion {
    /// Major.
    pub major: u32,
    /// Minor.
    pub minor: u32,
    /// Patch.
    pub patch: u32,
}

impl TrtVersion {
    /// Decodes `getInferLibVersion()`: `major*1000 + minor*100 + patch`
    /// before 10, `major*10000 + minor*100 + patch` from 10 on.
    pub fn from_library(value: u32) -> TrtVersion {
        if value >= 10_000 {
            TrtVersion {
                major: value / 10_000,
                minor: value / 100 % 100,
                patch: value % 100,
            }
        } else {
            TrtVersion {
                major: value / 1000,
                minor: value / 100 % 10,
                patch: value % 100,
            }
        }
    }
}

impl fmt::Display for TrtVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// What TensorRT, or the shim around it, reported when a call failed: the
/// C++ side hands over text, kept whole here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TrtError(pub String);

impl From<&str> for TrtError {
    fn from(message: &str) -> TrtError {
        TrtError(message.to_owned())
    }
}

/// Calls a shim function that reports failure through an error buffer.
fn checked(call: impl FnOnce(*mut c_char, usize) -> i32) -> Result<(), TrtError> {
    let mut error = vec![0u8; 8192];
    if call(error.as_mut_ptr().cast(), error.len()) == 0 {
        return Ok(());
    }
    let message = CStr::from_bytes_until_nul(&error)
        .map(|m| m.to_string_lossy().into_owned())
        .unwrap_or_default();
    Err(TrtError(if message.is_empty() {
        "TensorRT failed without a message".into()
    } else {
        message
    }))
}

/// Copies and frees a shim-allocated buffer.
#[allow(unsafe_code)]
fn take(mut bytes: ffi::Bytes) -> Vec<u8> {
    let out = if bytes.data.is_null() {
        Vec::new()
    } else {
        // SAFETY: the shim allocated `len` bytes at `data`.
        unsafe { std::slice::from_raw_parts(bytes.data.cast::<u8>(), bytes.len) }.to_vec()
    };
    // SAFETY: frees what the shim allocated, once.
    unsafe { ffi::ndt_bytes_free(&mut bytes) };
    out
}

#[allow(unsafe_code)]
unsafe extern "C" fn forward_log(severity: i32, message: *const c_char) {
    if message.is_null() {
        return;
    }
    // SAFETY: TensorRT passes a NUL-terminated message.
    let message = unsafe { CStr::from_ptr(message) }.to_string_lossy();
    match severity {
        0 | 1 => log::error!(target: "tensorrt", "{message}"),
        2 => log::warn!(target: "tensorrt", "{message}"),
        3 => log::debug!(target: "tensorrt", "{message}"),
        _ => log::trace!(target: "tensorrt", "{message}"),
    }
}

/// libnvinfer and libnvonnxparser, loaded.
pub struct TensorRt {
    raw: NonNull<ffi::Library>,
    version: TrtVersion,
}

// SAFETY: the library object is read-only after loading, except the
// logger's capture buffer, which the shim guards with a mutex; builders
// and runtimes are made per call.
#[allow(unsafe_code)]
unsafe impl Send for TensorRt {}
// SAFETY: as for Send.
#[allow(unsafe_code)]
unsafe impl Sync for TensorRt {}

impl Drop for TensorRt {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        // SAFETY: engines hold an Arc<TensorRt>, so none outlives this.
        unsafe { ffi::ndt_library_close(self.raw.as_ptr()) };
    }
}

/// What one build produced.
pub struct BuildOutput {
    /// The serialized engine.
    pub plan: Vec<u8>,
    /// The timing cache after the build, to seed the next one.
    pub timing_cache: Vec<u8>,
    /// The legacy calibrator's table (empty otherwise).
    pub calibration_table: Vec<u8>,
    /// The build's warnings and errors.
    pub log: Vec<String>,
}

/// A build step TensorRT reports (10 and later).
#[derive(Debug, Clone)]
pub enum BuildProgress<'a> {
    /// A phase began with this many steps.
    PhaseStart {
        /// The phase.
        phase: &'a str,
        /// Steps in it.
        steps: i32,
    },
    /// A step of a phase finished.
    Step {
        /// The phase.
        phase: &'a str,
        /// The step's index.
        step: i32,
    },
    /// A phase finished.
    PhaseFinish {
        /// The phase.
        phase: &'a str,
    },
}

/// How one build is asked for; the shim's options without pointers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildRequest {
    /// One of the shim's precision codes.
    pub precision: i32,
    /// FP16 for the layers an INT8 model leaves in float (< 11).
    pub int8_float_layers_fp16: bool,
    /// Builder workspace limit.
    pub workspace_bytes: u64,
    /// Top of the batch profile.
    pub max_batch: u32,
    /// DLA core, or none for the GPU.
    pub dla_core: Option<u32>,
}

type ProgressCallback<'a> = &'a mut dyn FnMut(BuildProgress<'_>) -> bool;

/// The legacy calibrator's side of a build (TensorRT < 11).
pub struct Calibration<'a> {
    /// The table an earlier build wrote (empty: calibrate from images).
    pub table: &'a [u8],
    /// The device address of the next batch for the named input, filled
    /// and synchronised; `None` when the images are used up.
    pub next_batch: &'a mut dyn FnMut(&str) -> Option<u64>,
}

#[allow(unsafe_code)]
unsafe extern "C" fn forward_calibration(user: *mut c_void, input: *const c_char) -> *mut c_void {
    if user.is_null() || input.is_null() {
        return std::ptr::null_mut();
    }
    // SAFETY: `user` is the `&mut dyn FnMut` build() passed, alive for the
    // whole build; `input` is NUL-terminated.
    let next = unsafe { &mut *user.cast::<&mut dyn FnMut(&str) -> Option<u64>>() };
    // SAFETY: as above.
    let input = unsafe { CStr::from_ptr(input) }.to_string_lossy();
    next(&input).map_or(std::ptr::null_mut(), |address| address as *mut c_void)
}

#[allow(unsafe_code)]
unsafe extern "C" fn forward_progress(
    user: *mut c_void,
    event: i32,
    phase: *const c_char,
    _parent: *const c_char,
    step: i32,
    steps: i32,
) -> i32 {
    if user.is_null() || phase.is_null() {
        return 0;
    }
    // SAFETY: `user` is the `&mut ProgressCallback` build() passed, alive
    // for the whole build; `phase` is NUL-terminated.
    let callback = unsafe { &mut *user.cast::<ProgressCallback<'_>>() };
    // SAFETY: as above.
    let phase = unsafe { CStr::from_ptr(phase) }.to_string_lossy();
    let progress = match event {
        0 => BuildProgress::PhaseStart {
            phase: &phase,
            steps,
        },
        1 => BuildProgress::Step {
            phase: &phase,
            step,
        },
        _ => BuildProgress::PhaseFinish { phase: &phase },
    };
    i32::from(!callback(progress))
}

impl TensorRt {
    /// Loads TensorRT: from the directory given at build time
    /// (`TENSORRT_LIB` / `TENSORRT_ROOT`), else through the loader's path.
    #[allow(unsafe_code)]
    pub fn open() -> Result<Arc<TensorRt>, TrtError> {
        // SAFETY: a constant.
        let major = unsafe { ffi::ndt_header_major() };
        let mut attempts = Vec::new();
        if let Some(dir) = option_env!("NANODETD_TENSORRT_LIB_DIR") {
            let dir = std::path::Path::new(dir);
            attempts.push((
                Some(dir.join(format!("libnvinfer.so.{major}"))),
                Some(dir.join(format!("libnvonnxparser.so.{major}"))),
            ));
        }
        attempts.push((None, None));
        let mut why = TrtError::from("no library to try");
        for (infer, parser) in attempts {
            let path = |p: Option<std::path::PathBuf>| {
                p.and_then(|p| CString::new(p.display().to_string()).ok())
            };
            let (infer, parser) = (path(infer), path(parser));
            let mut raw = std::ptr::null_mut();
            let opened = checked(|error, len| {
                // SAFETY: valid C strings or null, an out pointer, a
                // buffer of `len` bytes.
                unsafe {
                    ffi::ndt_library_open(
                        infer.as_ref().map_or(std::ptr::null(), |p| p.as_ptr()),
                        parser.as_ref().map_or(std::ptr::null(), |p| p.as_ptr()),
                        Some(forward_log),
                        &mut raw,
                        error,
                        len,
                    )
                }
            });
            match (opened, NonNull::new(raw)) {
                (Ok(()), Some(raw)) => {
                    // SAFETY: a library the shim just opened.
                    let version = unsafe { ffi::ndt_library_version(raw.as_ptr()) };
                    return Ok(Arc::new(TensorRt {
                        raw,
                        version: TrtVersion::from_library(version.max(0) as u32),
                    }));
                }
                (Err(e), _) => why = e,
                (Ok(()), None) => why = "the shim returned no library".into(),
            }
        }
        Err(why)
    }

    /// The loaded library's version (not the headers').
    pub fn version(&self) -> TrtVersion {
        self.version
    }

    /// The major version this binary's shim was compiled for.
    #[allow(unsafe_code)]
    pub fn header_major() -> u32 {
        // SAFETY: a constant.
        unsafe { ffi::ndt_header_major() }.max(0) as u32
    }

    /// DLA cores on this device (0 except on Jetson Xavier/Orin).
    #[allow(unsafe_code)]
    pub fn dla_cores(&self) -> u32 {
        // SAFETY: a live library.
        unsafe { ffi::ndt_library_dla_cores(self.raw.as_ptr()) }.max(0) as u32
    }

    /// Builds `onnx` into a plan. `progress` sees each step and may
    /// cancel by returning false.
    #[allow(unsafe_code)]
    pub fn build(
        &self,
        onnx: &[u8],
        request: &BuildRequest,
        timing_cache: &[u8],
        mut progress: ProgressCallback<'_>,
        calibration: Option<Calibration<'_>>,
    ) -> Result<BuildOutput, TrtError> {
        let (table, mut next_batch) = match calibration {
            Some(c) => (c.table, Some(c.next_batch)),
            None => (&[][..], None),
        };
        let options = ffi::BuildOptions {
            precision: request.precision,
            int8_float_layers_fp16: i32::from(request.int8_float_layers_fp16),
            workspace_bytes: request.workspace_bytes,
            max_batch: request.max_batch as i32,
            dla_core: request.dla_core.map_or(-1, |c| c as i32),
            timing_cache: timing_cache.as_ptr().cast(),
            timing_cache_len: timing_cache.len(),
            calibration_table: if table.is_empty() {
                std::ptr::null()
            } else {
                table.as_ptr().cast()
            },
            calibration_table_len: table.len(),
            calibration_batch_size: 1,
            calibration_batch: next_batch
                .is_some()
                .then_some(forward_calibration as ffi::CalibrationFn),
            calibration_user: next_batch.as_mut().map_or(std::ptr::null_mut(), |n| {
                (n as *mut &mut dyn FnMut(&str) -> Option<u64>).cast()
            }),
            progress: Some(forward_progress),
            progress_user: (&mut progress as *mut ProgressCallback<'_>).cast(),
        };
        let mut result = ffi::BuildResult {
            plan: ffi::Bytes {
                data: std::ptr::null_mut(),
                len: 0,
            },
            timing_cache: ffi::Bytes {
                data: std::ptr::null_mut(),
                len: 0,
            },
            calibration_table: ffi::Bytes {
                data: std::ptr::null_mut(),
                len: 0,
            },
            log: ffi::Bytes {
                data: std::ptr::null_mut(),
                len: 0,
            },
        };
        let built = checked(|error, len| {
            // SAFETY: `onnx` and `options` outlive the call, `progress`
            // and `next_batch` too (on this frame); `result` is written by
            // the shim.
            unsafe {
                ffi::ndt_build(
                    self.raw.as_ptr(),
                    onnx.as_ptr().cast(),
                    onnx.len(),
                    &options,
                    &mut result,
                    error,
                    len,
                )
            }
        });
        // Taken (and freed) whether or not the build succeeded.
        let output = BuildOutput {
            plan: take(result.plan),
            timing_cache: take(result.timing_cache),
            calibration_table: take(result.calibration_table),
            log: String::from_utf8_lossy(&take(result.log))
                .lines()
                .map(str::to_owned)
                .collect(),
        };
        built.map(|()| output)
    }

    /// Deserializes a plan.
    #[allow(unsafe_code)]
    pub fn load(
        self: &Arc<Self>,
        plan: &[u8],
        dla_core: Option<u32>,
    ) -> Result<LoadedPlan, TrtError> {
        let mut raw = std::ptr::null_mut();
        checked(|error, len| {
            // SAFETY: `plan` outlives the call (TensorRT copies it).
            unsafe {
                ffi::ndt_engine_load(
                    self.raw.as_ptr(),
                    plan.as_ptr().cast(),
                    plan.len(),
                    dla_core.map_or(-1, |c| c as i32),
                    &mut raw,
                    error,
                    len,
                )
            }
        })?;
        let raw = NonNull::new(raw).ok_or("the shim returned no engine")?;
        let mut loaded = LoadedPlan {
            raw,
            tensors: Vec::new(),
            _library: self.clone(),
        };
        // SAFETY: a live engine; names live as long as it does, and are
        // copied here anyway.
        let count = unsafe { ffi::ndt_engine_tensor_count(raw.as_ptr()) };
        for index in 0..count {
            let mut info = ffi::TensorInfo {
                name: std::ptr::null(),
                is_input: 0,
                data_type: 0,
                rank: 0,
                dims: [0; 8],
            };
            // SAFETY: a live engine, an index below its count, an out
            // struct on this frame.
            if unsafe { ffi::ndt_engine_tensor(raw.as_ptr(), index, &mut info) } != 0
                || info.name.is_null()
            {
                return Err(TrtError(format!(
                    "cannot read I/O tensor {index} of the plan"
                )));
            }
            let rank = info.rank.clamp(0, 8) as usize;
            // SAFETY: checked non-null above; TensorRT's name is
            // NUL-terminated and lives as long as the engine.
            let name = unsafe { CStr::from_ptr(info.name) }.to_owned();
            loaded.tensors.push(TensorBinding {
                name,
                is_input: info.is_input != 0,
                data_type: info.data_type,
                dims: info.dims[..rank].to_vec(),
            });
        }
        Ok(loaded)
    }
}

/// One I/O tensor of an engine.
#[derive(Debug, Clone)]
pub struct TensorBinding {
    /// Its name, for binding by name.
    pub name: CString,
    /// Input or output.
    pub is_input: bool,
    /// nvinfer1::DataType (0 float, 1 half, ...).
    pub data_type: i32,
    /// Dimensions, -1 where dynamic.
    pub dims: Vec<i64>,
}

/// nvinfer1::DataType::kFLOAT.
pub const DATA_TYPE_FLOAT: i32 = 0;

/// A deserialized engine.
pub struct LoadedPlan {
    raw: NonNull<ffi::Engine>,
    tensors: Vec<TensorBinding>,
    _library: Arc<TensorRt>,
}

// SAFETY: ICudaEngine is immutable once built and TensorRT allows
// creating contexts from several threads.
#[allow(unsafe_code)]
unsafe impl Send for LoadedPlan {}
// SAFETY: as for Send.
#[allow(unsafe_code)]
unsafe impl Sync for LoadedPlan {}

impl Drop for LoadedPlan {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        // SAFETY: contexts hold an Arc<LoadedPlan>, so none outlives it.
        unsafe { ffi::ndt_engine_free(self.raw.as_ptr()) };
    }
}

impl LoadedPlan {
    /// The engine's I/O tensors in TensorRT's order.
    pub fn tensors(&self) -> &[TensorBinding] {
        &self.tensors
    }

    /// A new execution context.
    #[allow(unsafe_code)]
    pub fn context(self: &Arc<Self>) -> Result<ExecutionContext, TrtError> {
        let mut raw = std::ptr::null_mut();
        checked(|error, len| {
            // SAFETY: a live engine.
            unsafe { ffi::ndt_context_create(self.raw.as_ptr(), &mut raw, error, len) }
        })?;
        Ok(ExecutionContext {
            raw: NonNull::new(raw).ok_or("the shim returned no context")?,
            _plan: self.clone(),
        })
    }
}

/// One execution context: per-thread state of a running engine.
pub struct ExecutionContext {
    raw: NonNull<ffi::Context>,
    _plan: Arc<LoadedPlan>,
}

// SAFETY: a context is used by one thread at a time (&mut self), which
// TensorRT allows; it may move between threads.
#[allow(unsafe_code)]
unsafe impl Send for ExecutionContext {}

impl Drop for ExecutionContext {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        // SAFETY: freed once; the engine is kept alive by `_plan`.
        unsafe { ffi::ndt_context_free(self.raw.as_ptr()) };
    }
}

impl ExecutionContext {
    /// Sets a dynamic input's shape for the next enqueue.
    #[allow(unsafe_code)]
    pub fn set_input_shape(&mut self, name: &CStr, dims: &[i64]) -> Result<(), TrtError> {
        checked(|error, len| {
            // SAFETY: live context, valid C string, `dims` of `rank`.
            unsafe {
                ffi::ndt_context_set_input_shape(
                    self.raw.as_ptr(),
                    name.as_ptr(),
                    dims.as_ptr(),
                    dims.len() as i32,
                    error,
                    len,
                )
            }
        })
    }

    /// Binds a tensor to a device address.
    ///
    /// # Safety
    /// `address` must point to device memory large enough for the tensor
    /// at the shape set, alive until the enqueued work has finished.
    #[allow(unsafe_code)]
    pub unsafe fn set_tensor_address(&mut self, name: &CStr, address: u64) -> Result<(), TrtError> {
        checked(|error, len| {
            // SAFETY: live context, valid C string; the address is the
            // caller's promise.
            unsafe {
                ffi::ndt_context_set_tensor_address(
                    self.raw.as_ptr(),
                    name.as_ptr(),
                    address as *mut c_void,
                    error,
                    len,
                )
            }
        })
    }

    /// Enqueues inference on `stream` (a raw CUstream).
    ///
    /// # Safety
    /// Every tensor must be bound to live device memory, and `stream`
    /// must belong to the context the memory was allocated in.
    #[allow(unsafe_code)]
    pub unsafe fn enqueue(&mut self, stream: *mut c_void) -> Result<(), TrtError> {
        checked(|error, len| {
            // SAFETY: the caller's promise.
            unsafe { ffi::ndt_context_enqueue(self.raw.as_ptr(), stream, error, len) }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn library_versions_decode_across_the_encoding_change() {
        assert_eq!(TrtVersion::from_library(8601).to_string(), "8.6.1");
        assert_eq!(TrtVersion::from_library(8502).to_string(), "8.5.2");
        assert_eq!(TrtVersion::from_library(100300).to_string(), "10.3.0");
        assert_eq!(TrtVersion::from_library(110100).to_string(), "11.1.0");
    }
}
