#!/usr/bin/env bash
# The GPU benchmark of issue 6: nanodetd's whole detector on ONNX Runtime's
# CUDA provider, beside Python onnxruntime-gpu and PyTorch, on a lent GPU
# machine that has CUDA 13, cuDNN 9 and PyTorch but no ONNX Runtime and no
# Rust. Nothing fetched here enters the repository.
#
# At most 64 MiB travel to that machine per call and its repository copy
# is laid anew each time, but /tmp survives between calls while it stays
# warm. So the onnxruntime-gpu wheel (about 250 MB) goes over in parts:
#
#   here:    scripts/gpu-bench.sh prepare        # build, split the wheel
#   there:   scripts/gpu-bench.sh receive        # once per part, carrying
#                                                # devrun/part (one part)
#   there:   scripts/gpu-bench.sh run            # carrying devrun/bin and
#                                                # devrun/assets
#   there:   scripts/gpu-bench.sh cameras        # the same carry: issue 21's
#                                                # 1..128-camera daemon runs
#
# `prepare` prints the exact sequence. The figures go to
# docs/PERFORMANCE.md with the card, the command and this output.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEEL_VERSION=1.31.1
WHEEL=onnxruntime_gpu-$WHEEL_VERSION-cp312-cp312-manylinux_2_28_x86_64.whl
PARTS=${PARTS:-/work/ortgpu/parts}
REMOTE=/tmp/nanodetd-ort

prepare() {
    local assets=${NANODETD_ASSETS:-../shared}
    mkdir -p "$PARTS" devrun/bin devrun/assets/models devrun/assets/samples
    if [ ! -s "$PARTS/../$WHEEL" ]; then
        python3 -m pip download --quiet "onnxruntime-gpu==$WHEEL_VERSION" --no-deps \
            --only-binary=:all: --python-version 3.12 \
            --platform manylinux_2_28_x86_64 -d "$PARTS/.."
    fi
    rm -f "$PARTS"/part-*
    # A part travels with the repository's tracked files (about 17 MB, the
    # demo model and photos most of it) under the 64 MiB limit: 44 MiB
    # parts were refused (2026-12-06), 36 MiB travel.
    split -b 36M -d "$PARTS/../$WHEEL" "$PARTS/part-"

    cargo build --release --features cuda
    # The GPU tests, at the dev profile (dependencies optimised anyway).
    local test_bin
    test_bin=$(cargo test --features cuda --test integration --no-run --message-format=json 2>/dev/null |
        python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "integration":
        print(m["executable"])')
    # Compressed: the stripped binaries are ~55 MB, a third of that
    # gzipped, and the whole carry must stay under 64 MiB.
    rm -rf devrun/bin/* devrun/assets/models/* devrun/assets/samples/*
    strip -o devrun/bin/nanodetd target/release/nanodetd
    strip -o devrun/bin/gpu-tests "$test_bin"
    gzip -9 devrun/bin/nanodetd devrun/bin/gpu-tests
    cp benches/gpu_peer.py benches/gpu_cameras.py devrun/bin/
    (cd "$PARTS/.." && sha256sum "$WHEEL" | cut -d' ' -f1) > devrun/bin/wheel.sha256
    # The trial-load test spawns nanodetd from the path cargo compiled into
    # it (CARGO_BIN_EXE_nanodetd); `run` puts the binary there.
    echo "$PWD/target/debug/nanodetd" > devrun/bin/test-exe-path
    cp "$assets"/models/nanodet-plus-m_320.onnx devrun/assets/models/
    for photo in hpc203_bus.jpg hpc203_street.png hpc203_zidane.jpg skimage_chelsea.png nanodet_000252.jpg; do
        cp "$assets/samples/$photo" devrun/assets/samples/
    done
    du -sh devrun/bin devrun/assets "$PARTS"/part-*
    echo "then, one call each (device tool, carry [\"devrun/part\"]):"
    for part in "$PARTS"/part-*; do
        echo "  cp $part devrun/part  &&  run: scripts/gpu-bench.sh receive"
    done
    echo "and last (carry [\"devrun/bin\", \"devrun/assets\"]): scripts/gpu-bench.sh run"
}

receive() {
    mkdir -p "$REMOTE/parts"
    local n
    n=$(find "$REMOTE/parts" -name 'part-*' | wc -l)
    cp devrun/part "$REMOTE/parts/part-$(printf %02d "$n")"
    ls -la "$REMOTE/parts"
}

# Directories holding the CUDA 13 runtime libraries and cuDNN 9 that the
# provider links against, wherever this machine keeps them.
cuda_library_path() {
    local dirs=()
    for lib in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcufft.so.12 libcurand.so.10 libcudnn.so.9; do
        local found
        found=$(find /usr/local/cuda*/lib64 /usr/lib/x86_64-linux-gnu /usr/local/lib/python3*/dist-packages /usr/local/lib/python3*/site-packages \
            /usr/lib/python3/dist-packages "$HOME"/.local/lib /opt -name "$lib" 2>/dev/null | head -1 || true)
        [ -n "$found" ] && dirs+=("$(dirname "$found")")
    done
    printf '%s\n' "${dirs[@]}" | sort -u | paste -sd:
}

# The wheel installed, the binaries unpacked, and the environment both
# nanodetd and the Python peers run in.
setup() {
    local wheel=$REMOTE/$WHEEL
    if [ ! -d "$REMOTE/site/onnxruntime" ]; then
        cat "$REMOTE"/parts/part-* > "$wheel"
        echo "wheel sha256: $(sha256sum "$wheel" | cut -d' ' -f1), expected $(cat devrun/bin/wheel.sha256)"
        python3 -m pip install --quiet --no-index --no-deps --target "$REMOTE/site" "$wheel"
    fi
    mkdir -p "$REMOTE/bin"
    gunzip -c devrun/bin/nanodetd.gz > "$REMOTE/bin/nanodetd"
    gunzip -c devrun/bin/gpu-tests.gz > "$REMOTE/bin/gpu-tests"
    chmod +x "$REMOTE"/bin/*
    install -D -m 755 "$REMOTE/bin/nanodetd" "$(cat devrun/bin/test-exe-path)"
    export PYTHONPATH=$REMOTE/site
    export LD_LIBRARY_PATH=$(cuda_library_path):/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
    export ORT_DYLIB_PATH=$REMOTE/site/onnxruntime/capi/libonnxruntime.so.$WHEEL_VERSION
    export NANODETD_ASSETS=$PWD/devrun/assets
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
}

run() {
    setup
    local frame=devrun/assets/samples/hpc203_street.png iters=${ITERS:-1000} failed=0
    # Each step runs even when one before it failed: one call to that
    # machine is precious, and every figure in it counts.
    for model in nanodet-plus-m_320; do
        echo "== nanodetd bench-gpu, $model, CUDA graph"
        "$REMOTE/bin/nanodetd" bench-gpu --model devrun/assets/models/$model.onnx \
            --image "$frame" --iters "$iters" || failed=1
        # QUICK=1: the CUDA-graph figures and the tests only.
        [ "${QUICK:-0}" = 1 ] && continue
        echo "== nanodetd bench-gpu, $model, no CUDA graph"
        "$REMOTE/bin/nanodetd" bench-gpu --model devrun/assets/models/$model.onnx \
            --image "$frame" --iters "$iters" --no-cuda-graph || failed=1
        echo "== nanodetd bench-gpu, $model, TensorRT provider asked (no TensorRT here: falls back)"
        "$REMOTE/bin/nanodetd" bench-gpu --model devrun/assets/models/$model.onnx \
            --image "$frame" --iters 100 --provider tensorrt 2>&1 | grep -v '^  ' || failed=1
        echo "== peers, $model"
        python3 devrun/bin/gpu_peer.py devrun/assets/models/$model.onnx --iters "$iters" || failed=1
    done
    # Issue 21: batches, nanodetd's detector and the peer on the same
    # batchable model (nanodetd writes the one its CUDA provider runs).
    for batch in ${BATCHES:-8 32 64 128}; do
        for precision in ${PRECISIONS:-fp32 fp16}; do
            local flag=() written=$REMOTE/batch-$batch-$precision.onnx
            [ "$precision" = fp16 ] && flag=(--fp16)
            echo "== nanodetd bench-gpu, nanodet-plus-m_320, batch $batch, $precision"
            "$REMOTE/bin/nanodetd" bench-gpu --model devrun/assets/models/nanodet-plus-m_320.onnx \
                --image "$frame" --iters "${BATCH_ITERS:-200}" --batch "$batch" "${flag[@]}" \
                --write-model "$written" || failed=1
            echo "== peer, the same model, batch $batch, $precision"
            python3 devrun/bin/gpu_peer.py "$written" --batch "$batch" \
                --iters "${BATCH_ITERS:-200}" --warmup 20 || failed=1
        done
    done
    [ "${SKIP_TESTS:-0}" = 1 ] || gpu_tests || failed=1
    return $failed
}

gpu_tests() {
    echo "== tests/integration/gpu.rs"
    NANODETD_REQUIRE_GPU=1 "$REMOTE/bin/gpu-tests" gpu:: --test-threads 1 --nocapture "$@"
}

# Issue 21: nanodetd itself, 1 to 128 synthetic 1080p cameras at 30 fps,
# batch 1 against batched, FP32 and FP16 (benches/gpu_cameras.py; its
# arguments pass through, e.g. --cameras 64 --batches 32).
cameras() {
    setup
    python3 devrun/bin/gpu_cameras.py --nanodetd "$REMOTE/bin/nanodetd" \
        --model devrun/assets/models/nanodet-plus-m_320.onnx \
        --photo devrun/assets/samples/hpc203_street.png "$@"
}

case "${1:-}" in
    prepare) prepare ;;
    receive) receive ;;
    run) run ;;
    tests) shift; setup; gpu_tests "$@" ;;
    cameras) shift; cameras "$@" ;;
    *) echo "usage: $0 prepare|receive|run|tests [test filter]|cameras [gpu_cameras.py arguments]" >&2; exit 2 ;;
esac
