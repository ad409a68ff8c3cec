#!/usr/bin/env bash
# nanodetd bench (tract) and onnxruntime (Python, 1 thread) on the same
# models, machine and run, for docs/PERFORMANCE.md.
# Usage: benches/compare.sh [ITERS]   (needs: pip install onnxruntime numpy)
set -euo pipefail
cd "$(dirname "$0")/.."
iters=${1:-50}
assets=${NANODETD_ASSETS:-../shared}
cargo build --release --quiet
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
for m in nanodet-m_320 nanodet-plus-m_320 nanodet-plus-m_416; do
  model="$assets/models/$m.onnx"
  echo "== $m"
  ./target/release/nanodetd bench --model "$model" --iters "$iters"
  ./target/release/nanodetd bench --model "$model" --iters "$iters" --image "$assets/samples/hpc203_bus.jpg" | tail -n +2 | sed 's/^/  bus.jpg /'
  echo "  onnxruntime session.run: $(python3 benches/peer_onnxruntime.py "$model" "$iters")"
done
