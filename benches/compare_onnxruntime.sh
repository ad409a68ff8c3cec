#!/usr/bin/env bash
# The onnxruntime backend beside tract and beside Python onnxruntime's bare
# session.run, same machine, same run, one thread each, for
# docs/PERFORMANCE.md. FP32 models, and the INT8 Q/DQ model nanodetd makes
# of nanodet-plus-m_320 (ONNX Runtime runs it with int8 kernels).
# Usage: benches/compare_onnxruntime.sh [ITERS]   (needs: pip install onnxruntime numpy)
set -euo pipefail
cd "$(dirname "$0")/.."
iters=${1:-100}
assets=${NANODETD_ASSETS:-../shared}
cargo build --release --quiet
export ORT_DYLIB_PATH=${ORT_DYLIB_PATH:-$(python3 -c "import glob, os, onnxruntime; print(sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), 'capi', 'libonnxruntime.so*')))[-1])")}
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); ONNX Runtime $ORT_DYLIB_PATH"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
./target/release/nanodetd quantize --model "$assets/models/nanodet-plus-m_320.onnx" \
    --calibration "$assets/datasets/calibration-80" --out "$work/nanodet-plus-m_320.int8.onnx" >/dev/null 2>&1
for model in "$assets/models/nanodet-plus-m_320.onnx" "$work/nanodet-plus-m_320.int8.onnx" \
    "$assets/models/nanodet-plus-m_416.onnx" "$assets/models/nanodet-m_320.onnx"; do
  echo "== $(basename "$model")"
  for backend in tract onnxruntime; do
    ./target/release/nanodetd bench --backend "$backend" --model "$model" --iters "$iters" \
        --image "$assets/samples/hpc203_bus.jpg" --json |
      python3 -c "import json,sys; r=json.load(sys.stdin); s=r['stages']; print(f\"  {r['backend']:<12} preprocess {s['preprocess']['median_ms']:.2f}  inference {s['inference']['median_ms']:.2f} (p99 {s['inference']['p99_ms']:.2f})  postprocess {s['postprocess']['median_ms']:.2f}  pre+inf+post {s['preprocess']['median_ms']+s['inference']['median_ms']+s['postprocess']['median_ms']:.2f} ms\")"
  done
  echo "  python session.run: $(python3 benches/peer_onnxruntime.py "$model" "$iters")"
done
