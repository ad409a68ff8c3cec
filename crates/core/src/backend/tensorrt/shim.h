/* The C ABI between nanodetd (Rust) and TensorRT (C++). The shim loads
 * libnvinfer and libnvonnxparser with dlopen, so a binary built with the
 * `tensorrt` feature starts on a machine without them and says so.
 *
 * Every function that can fail returns 0 on success and otherwise writes
 * a NUL-terminated message into `error` (at most `error_len` bytes).
 * Objects are created and freed only through these functions; the Rust
 * side owns their lifetimes. No C++ exception crosses this boundary. */

#ifndef NANODETD_TRT_SHIM_H
#define NANODETD_TRT_SHIM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ndt_library ndt_library;
typedef struct ndt_engine ndt_engine;
typedef struct ndt_context ndt_context;

/* ILogger::Severity: 0 internal error, 1 error, 2 warning, 3 info, 4 verbose. */
typedef void (*ndt_log_fn)(int32_t severity, const char* message);

/* Build progress (TensorRT 10+). event: 0 phase started (steps = its
 * number of steps), 1 step finished (step = its index), 2 phase finished.
 * Return nonzero to cancel the build. */
typedef int32_t (*ndt_progress_fn)(void* user, int32_t event, const char* phase,
                                   const char* parent, int32_t step, int32_t steps);

/* Legacy INT8 calibrator (TensorRT < 11): the device address of the next
 * calibration batch for `input`, already filled, or NULL when done. */
typedef void* (*ndt_calibration_fn)(void* user, const char* input);

typedef struct ndt_bytes {
    void* data; /* malloc'ed by the shim; release with ndt_bytes_free */
    size_t len;
} ndt_bytes;

enum ndt_precision {
    NDT_FP32 = 0,
    NDT_FP16 = 1,
    NDT_INT8_QDQ = 2,        /* explicit quantization from Q/DQ nodes */
    NDT_INT8_CALIBRATOR = 3, /* implicit, IInt8EntropyCalibrator2 (< 11) */
};

typedef struct ndt_build_options {
    int32_t precision; /* enum ndt_precision */
    /* Allow FP16 for the layers an INT8 model leaves in float (< 11; 11
     * builds every network strongly typed, in the ONNX's own types). */
    int32_t int8_float_layers_fp16;
    uint64_t workspace_bytes; /* 0: TensorRT's default */
    int32_t max_batch;        /* profile 1..max_batch on a dynamic batch */
    int32_t dla_core;         /* -1: GPU only */
    const void* timing_cache; /* previous serialized timing cache, or NULL */
    size_t timing_cache_len;
    const void* calibration_table; /* NDT_INT8_CALIBRATOR: cached table, or NULL */
    size_t calibration_table_len;
    int32_t calibration_batch_size;
    ndt_calibration_fn calibration_batch;
    void* calibration_user;
    ndt_progress_fn progress; /* may be NULL */
    void* progress_user;
} ndt_build_options;

typedef struct ndt_build_result {
    ndt_bytes plan;
    ndt_bytes timing_cache;      /* to persist for the next build */
    ndt_bytes calibration_table; /* NDT_INT8_CALIBRATOR only */
    ndt_bytes log;               /* the build's warnings and errors, as text */
} ndt_build_result;

typedef struct ndt_tensor_info {
    const char* name; /* valid while the engine lives */
    int32_t is_input;
    int32_t data_type; /* nvinfer1::DataType */
    int32_t rank;
    int64_t dims[8]; /* -1 where dynamic */
} ndt_tensor_info;

/* The TensorRT major version the shim was compiled for. */
int32_t ndt_header_major(void);

/* dlopens libnvinfer and libnvonnxparser: the given paths, or when NULL
 * libnvinfer.so.N / libnvonnxparser.so.N for the compiled major N. A
 * missing parser is not an error here: the library can still run plans,
 * and ndt_build says what is missing. */
int32_t ndt_library_open(const char* nvinfer, const char* onnxparser, ndt_log_fn log,
                         ndt_library** out, char* error, size_t error_len);
void ndt_library_close(ndt_library* library);
/* getInferLibVersion() of the loaded library: the run-time version. */
int32_t ndt_library_version(const ndt_library* library);
/* DLA cores the builder sees (0 off Jetson). */
int32_t ndt_library_dla_cores(ndt_library* library);

int32_t ndt_build(ndt_library* library, const void* onnx, size_t onnx_len,
                  const ndt_build_options* options, ndt_build_result* out, char* error,
                  size_t error_len);
void ndt_bytes_free(ndt_bytes* bytes);

int32_t ndt_engine_load(ndt_library* library, const void* plan, size_t plan_len, int32_t dla_core,
                        ndt_engine** out, char* error, size_t error_len);
void ndt_engine_free(ndt_engine* engine);
int32_t ndt_engine_tensor_count(const ndt_engine* engine);
int32_t ndt_engine_tensor(const ndt_engine* engine, int32_t index, ndt_tensor_info* out);

int32_t ndt_context_create(ndt_engine* engine, ndt_context** out, char* error, size_t error_len);
void ndt_context_free(ndt_context* context);
int32_t ndt_context_set_input_shape(ndt_context* context, const char* name, const int64_t* dims,
                                    int32_t rank, char* error, size_t error_len);
int32_t ndt_context_set_tensor_address(ndt_context* context, const char* name, void* address,
                                       char* error, size_t error_len);
/* enqueueV3 on `stream` (a CUstream / cudaStream_t). */
int32_t ndt_context_enqueue(ndt_context* context, void* stream, char* error, size_t error_len);

#ifdef __cplusplus
}
#endif

#endif
