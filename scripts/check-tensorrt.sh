#!/usr/bin/env bash
# Compiles the TensorRT shim against one set of TensorRT and CUDA headers,
# with every warning an error, and checks that the object file needs no
# TensorRT or CUDA symbol at link time (the shim dlopens TensorRT).
#
#   scripts/check-tensorrt.sh TENSORRT_INCLUDE CUDA_INCLUDE [PARSER_INCLUDE]
#
# PARSER_INCLUDE holds NvOnnxParser.h where TENSORRT_INCLUDE does not
# (before TensorRT 11 it lives in onnx/onnx-tensorrt). Used to check 8.6,
# 10.3 and 11.x on machines without TensorRT: see docs/TENSORRT.md.
set -euo pipefail
if (($# < 2)); then
    sed -n '2,10p' "$0" >&2
    exit 2
fi
trt=$1 cuda=$2 parser=${3:-$1}
for f in "$trt/NvInfer.h" "$cuda/cuda_runtime_api.h" "$parser/NvOnnxParser.h"; do
    [[ -f $f ]] || { echo "check-tensorrt: $f not found" >&2; exit 2; }
done
cxx=${CXX:-g++}
here=$(cd "$(dirname "$0")/.." && pwd)
shim=$here/crates/core/src/backend/tensorrt/shim.cpp
flags=(-std=c++17 -Wall -Wextra -Werror -isystem "$trt" -isystem "$parser" -isystem "$cuda")
version=$(printf '#include <NvInferVersion.h>\nNV_TENSORRT_MAJOR.NV_TENSORRT_MINOR.NV_TENSORRT_PATCH\n' |
    "$cxx" -E -P -isystem "$trt" -x c++ - | tail -n 1 | tr -d ' ')
"$cxx" "${flags[@]}" -fsyntax-only "$shim"
obj=$(mktemp --suffix=.o)
trap 'rm -f "$obj"' EXIT
"$cxx" "${flags[@]}" -fPIC -O2 -c "$shim" -o "$obj"
linked=$(nm -C --undefined-only "$obj" | grep -E 'nvinfer1|nvonnxparser|cuda|createInfer|getInferLibVersion' || true)
if [[ -n $linked ]]; then
    echo "check-tensorrt: TensorRT $version: the shim would link against:" >&2
    echo "$linked" >&2
    exit 1
fi
echo "TensorRT $version: shim compiles with -Wall -Wextra -Werror and links nothing from TensorRT or CUDA"
