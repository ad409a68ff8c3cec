#!/usr/bin/env bash
# Checks the TensorRT shim against the public headers of TensorRT 8.6, 10.3
# and 11.x, the versions JetPack 6 and x86 boxes run. Nothing fetched here
# enters the repository: it all goes under WORK (default /tmp/trt-headers).
#
#   scripts/check-tensorrt-versions.sh [WORK]
#
# Sources (override with TRT_REPO / ONNX_TRT_REPO, e.g. local mirrors):
#   NVIDIA/TensorRT include/ on release/8.6, release/10.3 and main;
#   onnx/onnx-tensorrt NvOnnxParser.h on 8.6-GA and 10.1-GA (before 11 the
#   parser header lives there); CUDA headers from the PyPI wheels
#   nvidia-cuda-runtime and nvidia-cuda-crt.
set -euo pipefail
work=${1:-/tmp/trt-headers}
trt_repo=${TRT_REPO:-https://github.com/NVIDIA/TensorRT}
onnx_repo=${ONNX_TRT_REPO:-https://github.com/onnx/onnx-tensorrt}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$work"

mirror() { # URL-or-path name
    local dir=$work/$2.git
    if [[ -d $1 ]]; then
        echo "$1"
    else
        [[ -d $dir ]] || git clone --quiet --bare --filter=blob:none "$1" "$dir"
        echo "$dir"
    fi
}
trt=$(mirror "$trt_repo" tensorrt)
onnx=$(mirror "$onnx_repo" onnx-tensorrt)

for branch in release/8.6 release/10.3 main; do
    dir=$work/${branch//\//_}
    [[ -f $dir/include/NvInfer.h ]] || { mkdir -p "$dir"; git -C "$trt" archive "$branch" include | tar -x -C "$dir"; }
done
for tag in 8.6-GA 10.1-GA; do
    mkdir -p "$work/onnx-tensorrt-$tag"
    git -C "$onnx" show "$tag:NvOnnxParser.h" >"$work/onnx-tensorrt-$tag/NvOnnxParser.h"
done
if [[ ! -f $work/cuda/nvidia/cu13/include/cuda_runtime_api.h ]]; then
    python3 -m pip download --quiet --no-deps -d "$work/wheels" nvidia-cuda-runtime nvidia-cuda-crt
    for w in "$work"/wheels/*.whl; do python3 -m zipfile -e "$w" "$work/cuda"; done
fi
cuda=$(dirname "$(find "$work/cuda" -name cuda_runtime_api.h | head -n 1)")

"$here/check-tensorrt.sh" "$work/release_8.6/include" "$cuda" "$work/onnx-tensorrt-8.6-GA"
"$here/check-tensorrt.sh" "$work/release_10.3/include" "$cuda" "$work/onnx-tensorrt-10.1-GA"
"$here/check-tensorrt.sh" "$work/main/include" "$cuda"
