// The only C++ in nanodetd: TensorRT's API behind the C ABI in shim.h.
//
// Nothing here links against TensorRT. The four factory functions TensorRT
// exports with C linkage are looked up with dlsym; everything else is a
// virtual call on the objects they return, so one binary starts with or
// without TensorRT installed. Version differences (8.5/8.6, 10.x, 11.x)
// are settled here, on NV_TENSORRT_MAJOR as the compiler sees it, and
// nowhere else.

#include "shim.h"

#include <NvInfer.h>
#include <NvOnnxParser.h>

#include <dlfcn.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <vector>

namespace {

using CreateFn = void* (*) (void*, int32_t);
using CreateParserFn = void* (*) (void*, void*, int);
using VersionFn = int32_t (*)();

void set_error(char* error, size_t error_len, const std::string& message)
{
    if (error != nullptr && error_len > 0) {
        std::snprintf(error, error_len, "%s", message.c_str());
    }
}

int32_t fail(char* error, size_t error_len, const std::string& message)
{
    set_error(error, error_len, message);
    return 1;
}

ndt_bytes copy_bytes(const void* data, size_t len)
{
    ndt_bytes out{nullptr, 0};
    if (data != nullptr && len > 0) {
        out.data = std::malloc(len);
        if (out.data != nullptr) {
            std::memcpy(out.data, data, len);
            out.len = len;
        }
    }
    return out;
}

// Forwards TensorRT's messages to the Rust logger, and keeps the warnings
// and errors of a build for the plan's sidecar.
class Logger : public nvinfer1::ILogger {
public:
    explicit Logger(ndt_log_fn forward) : mForward(forward) {}

    void log(Severity severity, const char* message) noexcept override
    {
        if (mForward != nullptr) {
            mForward(static_cast<int32_t>(severity), message);
        }
        if (severity <= Severity::kWARNING) {
            try {
                std::lock_guard<std::mutex> lock(mMutex);
                if (mCapturing && mCaptured.size() < 64 * 1024) {
                    mCaptured += severity == Severity::kWARNING ? "warning: " : "error: ";
                    mCaptured += message;
                    mCaptured += '\n';
                }
            } catch (...) {
                // Losing a log line must not lose the build.
            }
        }
    }

    void capture()
    {
        std::lock_guard<std::mutex> lock(mMutex);
        mCaptured.clear();
        mCapturing = true;
    }

    std::string captured()
    {
        std::lock_guard<std::mutex> lock(mMutex);
        mCapturing = false;
        return mCaptured;
    }

private:
    ndt_log_fn mForward;
    std::mutex mMutex;
    bool mCapturing = false;
    std::string mCaptured;
};

template <typename T>
struct Destroy {
    void operator()(T* object) const noexcept
    {
        delete object;
    }
};
template <typename T>
using Owned = std::unique_ptr<T, Destroy<T>>;

nvinfer1::Dims make_dims(const int64_t* values, int32_t rank)
{
    nvinfer1::Dims dims{};
    dims.nbDims = rank;
    for (int32_t i = 0; i < rank && i < nvinfer1::Dims::MAX_DIMS; ++i) {
        dims.d[i] = static_cast<decltype(dims.d[0] + 0)>(values[i]);
    }
    return dims;
}

#if NV_TENSORRT_MAJOR >= 10
// TensorRT calls this from several internal threads; the Rust callback
// takes `&mut`, so calls into it are serialised here.
class ProgressMonitor : public nvinfer1::IProgressMonitor {
public:
    ProgressMonitor(ndt_progress_fn forward, void* user) : mForward(forward), mUser(user) {}

    void phaseStart(const char* phase, const char* parent, int32_t steps) noexcept override
    {
        forward(0, phase, parent, 0, steps);
    }

    bool stepComplete(const char* phase, int32_t step) noexcept override
    {
        forward(1, phase, nullptr, step, 0);
        return !mCancelled.load();
    }

    void phaseFinish(const char* phase) noexcept override
    {
        forward(2, phase, nullptr, 0, 0);
    }

    bool cancelled() const
    {
        return mCancelled.load();
    }

private:
    void forward(int32_t event, const char* phase, const char* parent, int32_t step, int32_t steps) noexcept
    {
        try {
            std::lock_guard<std::mutex> lock(mMutex);
            if (mForward(mUser, event, phase, parent, step, steps) != 0) {
                mCancelled.store(true);
            }
        } catch (...) {
            // A progress report lost to a failed lock must not stop the build.
        }
    }

    ndt_progress_fn mForward;
    void* mUser;
    std::mutex mMutex;
    std::atomic<bool> mCancelled{false};
};
#endif

#if NV_TENSORRT_MAJOR < 11
// The implicit-quantization calibrator TensorRT 10 deprecated and 11
// removed, for `int8_mode = "calibrator"` on older JetPacks. Batches come
// from Rust, already preprocessed by the CPU path the Q/DQ quantizer uses.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
class Calibrator : public nvinfer1::IInt8EntropyCalibrator2 {
public:
    Calibrator(const ndt_build_options& options)
        : mBatchSize(options.calibration_batch_size), mNext(options.calibration_batch),
          mUser(options.calibration_user)
    {
        if (options.calibration_table != nullptr) {
            const char* table = static_cast<const char*>(options.calibration_table);
            mTable.assign(table, table + options.calibration_table_len);
        }
    }

    int32_t getBatchSize() const noexcept override
    {
        return mBatchSize;
    }

    bool getBatch(void* bindings[], const char* names[], int32_t count) noexcept override
    {
        for (int32_t i = 0; i < count; ++i) {
            void* batch = mNext(mUser, names[i]);
            if (batch == nullptr) {
                return false;
            }
            bindings[i] = batch;
        }
        return true;
    }

    const void* readCalibrationCache(size_t& length) noexcept override
    {
        length = mTable.size();
        return mTable.empty() ? nullptr : mTable.data();
    }

    void writeCalibrationCache(const void* cache, size_t length) noexcept override
    {
        try {
            const char* table = static_cast<const char*>(cache);
            mWritten.assign(table, table + length);
        } catch (...) {
            mWritten.clear();
        }
    }

    const std::vector<char>& written() const
    {
        return mWritten;
    }

private:
    int32_t mBatchSize;
    ndt_calibration_fn mNext;
    void* mUser;
    std::vector<char> mTable;
    std::vector<char> mWritten;
};
#pragma GCC diagnostic pop
#endif

} // namespace

struct ndt_library {
    void* nvinfer = nullptr;
    void* parser = nullptr;
    CreateFn create_builder = nullptr;
    CreateFn create_runtime = nullptr;
    VersionFn version = nullptr;
    CreateParserFn create_parser = nullptr;
    std::string parser_missing;
    std::unique_ptr<Logger> logger;
};

struct ndt_engine {
    ndt_library* library = nullptr;
    // The runtime must outlive the engines it made: members are destroyed
    // in reverse order, so `engine` goes first.
    Owned<nvinfer1::IRuntime> runtime;
    Owned<nvinfer1::ICudaEngine> engine;
    std::vector<std::string> names;
};

struct ndt_context {
    Owned<nvinfer1::IExecutionContext> context;
};

extern "C" {

int32_t ndt_header_major(void)
{
    return NV_TENSORRT_MAJOR;
}

int32_t ndt_library_open(const char* nvinfer, const char* onnxparser, ndt_log_fn log,
                         ndt_library** out, char* error, size_t error_len)
{
    try {
        const std::string major = std::to_string(NV_TENSORRT_MAJOR);
        const std::string infer_name = nvinfer != nullptr ? nvinfer : "libnvinfer.so." + major;
        const std::string parser_name =
            onnxparser != nullptr ? onnxparser : "libnvonnxparser.so." + major;
        auto library = std::make_unique<ndt_library>();
        library->nvinfer = dlopen(infer_name.c_str(), RTLD_NOW | RTLD_LOCAL);
        if (library->nvinfer == nullptr) {
            const char* why = dlerror();
            return fail(error, error_len,
                        "cannot load " + infer_name + " (TensorRT " + major +
                            ".x, which this build targets): " + (why != nullptr ? why : "?"));
        }
        library->create_builder =
            reinterpret_cast<CreateFn>(dlsym(library->nvinfer, "createInferBuilder_INTERNAL"));
        library->create_runtime =
            reinterpret_cast<CreateFn>(dlsym(library->nvinfer, "createInferRuntime_INTERNAL"));
        library->version = reinterpret_cast<VersionFn>(dlsym(library->nvinfer, "getInferLibVersion"));
        if (library->create_builder == nullptr || library->create_runtime == nullptr ||
            library->version == nullptr) {
            dlclose(library->nvinfer);
            return fail(error, error_len, infer_name + " lacks TensorRT's entry points");
        }
        library->parser = dlopen(parser_name.c_str(), RTLD_NOW | RTLD_LOCAL);
        if (library->parser != nullptr) {
            library->create_parser = reinterpret_cast<CreateParserFn>(
                dlsym(library->parser, "createNvOnnxParser_INTERNAL"));
        }
        if (library->create_parser == nullptr) {
            const char* why = dlerror();
            library->parser_missing =
                "cannot load " + parser_name + ": " + (why != nullptr ? why : "no parser entry point");
        }
        library->logger = std::make_unique<Logger>(log);
        *out = library.release();
        return 0;
    } catch (const std::exception& e) {
        return fail(error, error_len, e.what());
    }
}

void ndt_library_close(ndt_library* library)
{
    if (library == nullptr) {
        return;
    }
    if (library->parser != nullptr) {
        dlclose(library->parser);
    }
    dlclose(library->nvinfer);
    delete library;
}

int32_t ndt_library_version(const ndt_library* library)
{
    return library->version();
}

int32_t ndt_library_dla_cores(ndt_library* library)
{
    Owned<nvinfer1::IBuilder> builder(static_cast<nvinfer1::IBuilder*>(
        library->create_builder(library->logger.get(), NV_TENSORRT_VERSION)));
    return builder ? builder->getNbDLACores() : 0;
}

void ndt_bytes_free(ndt_bytes* bytes)
{
    if (bytes != nullptr) {
        std::free(bytes->data);
        bytes->data = nullptr;
        bytes->len = 0;
    }
}

int32_t ndt_build(ndt_library* library, const void* onnx, size_t onnx_len,
                  const ndt_build_options* options, ndt_build_result* out, char* error,
                  size_t error_len)
{
    try {
        *out = ndt_build_result{};
        if (library->create_parser == nullptr) {
            return fail(error, error_len, library->parser_missing);
        }
        Logger& logger = *library->logger;
        Owned<nvinfer1::IBuilder> builder(
            static_cast<nvinfer1::IBuilder*>(library->create_builder(&logger, NV_TENSORRT_VERSION)));
        if (!builder) {
            return fail(error, error_len, "createInferBuilder failed (no usable GPU?)");
        }
        logger.capture();

        nvinfer1::NetworkDefinitionCreationFlags flags = 0;
#if NV_TENSORRT_MAJOR < 10
        flags = 1U << static_cast<uint32_t>(nvinfer1::NetworkDefinitionCreationFlag::kEXPLICIT_BATCH);
#endif
        Owned<nvinfer1::INetworkDefinition> network(builder->createNetworkV2(flags));
        Owned<nvonnxparser::IParser> parser(static_cast<nvonnxparser::IParser*>(
            library->create_parser(network.get(), &logger, NV_ONNX_PARSER_VERSION)));
        if (!network || !parser) {
            return fail(error, error_len, "cannot create the network or the ONNX parser");
        }
        if (!parser->parse(onnx, onnx_len)) {
            std::string message = "the ONNX parser refused the model:";
            for (int32_t i = 0; i < parser->getNbErrors(); ++i) {
                const nvonnxparser::IParserError* e = parser->getError(i);
                message += "\n  node " + std::to_string(e->node());
#if NV_TENSORRT_MAJOR >= 10
                message += std::string(" ") + e->nodeName() + " (" + e->nodeOperator() + ")";
#endif
                message += std::string(": ") + e->desc();
            }
            return fail(error, error_len, message);
        }

        Owned<nvinfer1::IBuilderConfig> config(builder->createBuilderConfig());
        if (options->workspace_bytes > 0) {
            config->setMemoryPoolLimit(nvinfer1::MemoryPoolType::kWORKSPACE, options->workspace_bytes);
        }
#if NV_TENSORRT_MAJOR < 11
        switch (options->precision) {
        case NDT_FP16:
            config->setFlag(nvinfer1::BuilderFlag::kFP16);
            break;
        case NDT_INT8_QDQ:
        case NDT_INT8_CALIBRATOR:
            config->setFlag(nvinfer1::BuilderFlag::kINT8);
            if (options->int8_float_layers_fp16 != 0) {
                config->setFlag(nvinfer1::BuilderFlag::kFP16);
            }
            break;
        default:
            break;
        }
        std::unique_ptr<Calibrator> calibrator;
        if (options->precision == NDT_INT8_CALIBRATOR) {
            if (options->calibration_batch == nullptr && options->calibration_table == nullptr) {
                return fail(error, error_len, "the calibrator needs batches or a cached table");
            }
            calibrator = std::make_unique<Calibrator>(*options);
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
            config->setInt8Calibrator(calibrator.get());
#pragma GCC diagnostic pop
        }
#else
        // TensorRT 11 builds every network strongly typed: the ONNX's own
        // types decide, Q/DQ nodes give INT8, and there is no calibrator.
        if (options->precision == NDT_INT8_CALIBRATOR) {
            return fail(error, error_len,
                        "TensorRT 11 removed the implicit INT8 calibrator; use the Q/DQ model "
                        "(int8_mode = \"qdq\")");
        }
#endif

        if (options->dla_core >= 0) {
            if (builder->getNbDLACores() <= options->dla_core) {
                return fail(error, error_len,
                            "DLA core " + std::to_string(options->dla_core) + " asked for, this device has " +
                                std::to_string(builder->getNbDLACores()));
            }
            config->setDefaultDeviceType(nvinfer1::DeviceType::kDLA);
            config->setDLACore(options->dla_core);
            config->setFlag(nvinfer1::BuilderFlag::kGPU_FALLBACK);
        }

        // One profile over the batch, 1..max_batch, tuned for max_batch
        // (several cameras batch together).
        if (network->getNbInputs() != 1) {
            return fail(error, error_len,
                        "the model has " + std::to_string(network->getNbInputs()) +
                            " inputs; NanoDet has one image input");
        }
        nvinfer1::ITensor* input = network->getInput(0);
        nvinfer1::Dims dims = input->getDimensions();
        bool dynamic = false;
        for (int32_t i = 0; i < dims.nbDims; ++i) {
            dynamic = dynamic || dims.d[i] < 0;
        }
        if (dynamic) {
            if (dims.nbDims != 4 || dims.d[1] < 0 || dims.d[2] < 0 || dims.d[3] < 0) {
                return fail(error, error_len,
                            std::string("input ") + input->getName() +
                                " is dynamic beyond its batch; give the model a fixed input size");
            }
            nvinfer1::IOptimizationProfile* profile = builder->createOptimizationProfile();
            nvinfer1::Dims min = dims;
            nvinfer1::Dims max = dims;
            min.d[0] = 1;
            max.d[0] = options->max_batch > 0 ? options->max_batch : 1;
            profile->setDimensions(input->getName(), nvinfer1::OptProfileSelector::kMIN, min);
            profile->setDimensions(input->getName(), nvinfer1::OptProfileSelector::kOPT, max);
            profile->setDimensions(input->getName(), nvinfer1::OptProfileSelector::kMAX, max);
            config->addOptimizationProfile(profile);
        } else if (options->max_batch > 1) {
            return fail(error, error_len,
                        std::string("input ") + input->getName() +
                            " has a static batch; max_batch > 1 needs the dynamic-batch rewrite");
        }

        Owned<nvinfer1::ITimingCache> timing_cache(
            config->createTimingCache(options->timing_cache, options->timing_cache_len));
        if (timing_cache) {
            config->setTimingCache(*timing_cache, false);
        }

#if NV_TENSORRT_MAJOR >= 10
        std::unique_ptr<ProgressMonitor> monitor;
        if (options->progress != nullptr) {
            monitor = std::make_unique<ProgressMonitor>(options->progress, options->progress_user);
            config->setProgressMonitor(monitor.get());
        }
#endif

        Owned<nvinfer1::IHostMemory> plan(builder->buildSerializedNetwork(*network, *config));
        std::string log = logger.captured();
        out->log = copy_bytes(log.data(), log.size());
        if (!plan || plan->size() == 0) {
#if NV_TENSORRT_MAJOR >= 10
            if (monitor && monitor->cancelled()) {
                return fail(error, error_len, "the build was cancelled");
            }
#endif
            return fail(error, error_len, "buildSerializedNetwork failed:\n" + log);
        }
        out->plan = copy_bytes(plan->data(), plan->size());
        if (const nvinfer1::ITimingCache* used = config->getTimingCache()) {
            Owned<nvinfer1::IHostMemory> serialized(used->serialize());
            if (serialized) {
                out->timing_cache = copy_bytes(serialized->data(), serialized->size());
            }
        }
#if NV_TENSORRT_MAJOR < 11
        if (calibrator && !calibrator->written().empty()) {
            out->calibration_table =
                copy_bytes(calibrator->written().data(), calibrator->written().size());
        }
#endif
        if (out->plan.data == nullptr) {
            return fail(error, error_len, "out of memory copying the plan");
        }
        return 0;
    } catch (const std::exception& e) {
        return fail(error, error_len, std::string("building: ") + e.what());
    }
}

int32_t ndt_engine_load(ndt_library* library, const void* plan, size_t plan_len, int32_t dla_core,
                        ndt_engine** out, char* error, size_t error_len)
{
    try {
        auto engine = std::make_unique<ndt_engine>();
        engine->library = library;
        engine->runtime.reset(static_cast<nvinfer1::IRuntime*>(
            library->create_runtime(library->logger.get(), NV_TENSORRT_VERSION)));
        if (!engine->runtime) {
            return fail(error, error_len, "createInferRuntime failed");
        }
        if (dla_core >= 0) {
            engine->runtime->setDLACore(dla_core);
        }
        engine->engine.reset(engine->runtime->deserializeCudaEngine(plan, plan_len));
        if (!engine->engine) {
            return fail(error, error_len,
                        "TensorRT could not deserialize the plan (built by another version or "
                        "for another GPU?)");
        }
        for (int32_t i = 0; i < engine->engine->getNbIOTensors(); ++i) {
            engine->names.emplace_back(engine->engine->getIOTensorName(i));
        }
        *out = engine.release();
        return 0;
    } catch (const std::exception& e) {
        return fail(error, error_len, std::string("loading the plan: ") + e.what());
    }
}

void ndt_engine_free(ndt_engine* engine)
{
    delete engine;
}

int32_t ndt_engine_tensor_count(const ndt_engine* engine)
{
    return static_cast<int32_t>(engine->names.size());
}

int32_t ndt_engine_tensor(const ndt_engine* engine, int32_t index, ndt_tensor_info* out)
{
    if (index < 0 || static_cast<size_t>(index) >= engine->names.size()) {
        return 1;
    }
    const char* name = engine->names[static_cast<size_t>(index)].c_str();
    const nvinfer1::Dims dims = engine->engine->getTensorShape(name);
    out->name = name;
    out->is_input = engine->engine->getTensorIOMode(name) == nvinfer1::TensorIOMode::kINPUT;
    out->data_type = static_cast<int32_t>(engine->engine->getTensorDataType(name));
    out->rank = dims.nbDims;
    for (int32_t i = 0; i < dims.nbDims && i < 8; ++i) {
        out->dims[i] = dims.d[i];
    }
    return 0;
}

int32_t ndt_context_create(ndt_engine* engine, ndt_context** out, char* error, size_t error_len)
{
    try {
        auto context = std::make_unique<ndt_context>();
        context->context.reset(engine->engine->createExecutionContext());
        if (!context->context) {
            return fail(error, error_len, "createExecutionContext failed (out of device memory?)");
        }
        *out = context.release();
        return 0;
    } catch (const std::exception& e) {
        return fail(error, error_len, e.what());
    }
}

void ndt_context_free(ndt_context* context)
{
    delete context;
}

int32_t ndt_context_set_input_shape(ndt_context* context, const char* name, const int64_t* dims,
                                    int32_t rank, char* error, size_t error_len)
{
    if (rank < 0 || rank > nvinfer1::Dims::MAX_DIMS) {
        return fail(error, error_len, "bad rank");
    }
    if (!context->context->setInputShape(name, make_dims(dims, rank))) {
        return fail(error, error_len, std::string("setInputShape refused the shape of ") + name);
    }
    return 0;
}

int32_t ndt_context_set_tensor_address(ndt_context* context, const char* name, void* address,
                                       char* error, size_t error_len)
{
    if (!context->context->setTensorAddress(name, address)) {
        return fail(error, error_len, std::string("setTensorAddress refused ") + name);
    }
    return 0;
}

int32_t ndt_context_enqueue(ndt_context* context, void* stream, char* error, size_t error_len)
{
    if (!context->context->enqueueV3(static_cast<cudaStream_t>(stream))) {
        return fail(error, error_len, "enqueueV3 failed; TensorRT's log says why");
    }
    return 0;
}

} // extern "C"
