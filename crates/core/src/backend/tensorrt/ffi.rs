//! The declarations of `shim.h`, by hand: a dozen functions do not need
//! bindgen (and bindgen would need TensorRT's headers on every machine
//! that builds the docs).

#![allow(unsafe_code)]

use std::ffi::{c_char, c_void};

pub enum Library {}
pub enum Engine {}
pub enum Context {}

pub type LogFn = unsafe extern "C" fn(severity: i32, message: *const c_char);
pub type ProgressFn = unsafe extern "C" fn(
    user: *mut c_void,
    event: i32,
    phase: *const c_char,
    parent: *const c_char,
    step: i32,
    steps: i32,
) -> i32;
pub type CalibrationFn =
    unsafe extern "C" fn(user: *mut c_void, input: *const c_char) -> *mut c_void;

#[repr(C)]
pub struct Bytes {
    pub data: *mut c_void,
    pub len: usize,
}

pub const FP32: i32 = 0;
pub const FP16: i32 = 1;
pub const INT8_QDQ: i32 = 2;
pub const INT8_CALIBRATOR: i32 = 3;

#[repr(C)]
pub struct BuildOptions {
    pub precision: i32,
    pub int8_float_layers_fp16: i32,
    pub workspace_bytes: u64,
    pub max_batch: i32,
    pub dla_core: i32,
    pub timing_cache: *const c_void,
    pub timing_cache_len: usize,
    pub calibration_table: *const c_void,
    pub calibration_table_len: usize,
    pub calibration_batch_size: i32,
    pub calibration_batch: Option<CalibrationFn>,
    pub calibration_user: *mut c_void,
    pub progress: Option<ProgressFn>,
    pub progress_user: *mut c_void,
}

#[repr(C)]
pub struct BuildResult {
    pub plan: Bytes,
    pub timing_cache: Bytes,
    pub calibration_table: Bytes,
    pub log: Bytes,
}

#[repr(C)]
pub struct TensorInfo {
    pub name: *const c_char,
    pub is_input: i32,
    pub data_type: i32,
    pub rank: i32,
    pub dims: [i64; 8],
}

unsafe extern "C" {
    pub fn ndt_header_major() -> i32;
    pub fn ndt_library_open(
        nvinfer: *const c_char,
        onnxparser: *const c_char,
        log: Option<LogFn>,
        out: *mut *mut Library,
        error: *mut c_char,
        error_len: usize,
    ) -> i32;
    pub fn ndt_library_close(library: *mut Library);
    pub fn ndt_library_version(library: *const Library) -> i32;
    pub fn ndt_library_dla_cores(library: *mut Library) -> i32;
    pub fn ndt_build(
        library: *mut Library,
        onnx: *const c_void,
        onnx_len: usize,
        options: *const BuildOptions,
        out: *mut BuildResult,
        error: *mut c_char,
        error_len: usize,
    ) -> i32;
    pub fn ndt_bytes_free(bytes: *mut Bytes);
    pub fn ndt_engine_load(
        library: *mut Library,
        plan: *const c_void,
        plan_len: usize,
        dla_core: i32,
        out: *mut *mut Engine,
        error: *mut c_char,
        error_len: usize,
    ) -> i32;
    pub fn ndt_engine_free(engine: *mut Engine);
    pub fn ndt_engine_tensor_count(engine: *const Engine) -> i32;
    pub fn ndt_engine_tensor(engine: *const Engine, index: i32, out: *mut TensorInfo) -> i32;
    pub fn ndt_context_create(
        engine: *mut Engine,
        out: *mut *mut Context,
        error: *mut c_char,
        error_len: usize,
    ) -> i32;
    pub fn ndt_context_free(context: *mut Context);
    pub fn ndt_context_set_input_shape(
        context: *mut Context,
        name: *const c_char,
        dims: *const i64,
        rank: i32,
        error: *mut c_char,
        error_len: usize,
    ) -> i32;
    pub fn ndt_context_set_tensor_address(
        context: *mut Context,
        name: *const c_char,
        address: *mut c_void,
        error: *mut c_char,
        error_len: usize,
    ) -> i32;
    pub fn ndt_context_enqueue(
        context: *mut Context,
        stream: *mut c_void,
        error: *mut c_char,
        error_len: usize,
    ) -> i32;
}
