#!/usr/bin/env bash
# nanodetd on arm64, emulated: a subset of the test suite cross-compiled
# for aarch64 and run under qemu-aarch64, then the release binaries of both
# architectures on the same photos, whose detections must agree.
#
# The subset (emulation is roughly 20x slower than native here):
#   --lib                  every unit test: decoding per layout, NMS,
#                          preprocessing, pixel conversions, config, tracker;
#   tiny_model::           each layout end to end on small generated models;
#   real_models::          the four shared models on the sample photos;
#   camera_formats::       YUYV/NV12/MJPEG from a real photo, detected.
# Left out: the daemon, MQTT, INT8, onnxruntime and CLI tests. They spawn
# host programs (mosquitto, python3, onnxruntime's x86 library) that an
# emulated test cannot mix with, and their code is the same on both
# architectures.
#
# Usage: cross/test-arm64.sh  (after cross/setup.sh; cross/package.sh
# builds the release binaries, or this builds them)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
assets=$(realpath "${NANODETD_ASSETS:-$repo/../shared}")
export NANODETD_ASSETS=$assets
# A named CPU, not qemu's default `max`: QEMU 10's `max` has SVE, and under it
# one camera_formats test took 185 s against 14 s here (15 s with `max,sve=off`),
# which pushed CI past its limit. Cortex-A76 is QEMU's nearest model to the
# Jetson Orin's Cortex-A78AE: Armv8.2 with fp16 and dot product, no SVE.
runner="qemu-aarch64 -cpu cortex-a76 -L /usr/aarch64-linux-gnu"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER=$runner
start=$(date +%s)

# The features of the packaged binary (cross/build.sh): no embedded broker.
# Built in one cargo call, so that the last crates overlap on the two
# cores instead of the integration test waiting for a second call; then run.
build=(cargo-zigbuild test --no-default-features --target aarch64-unknown-linux-gnu.2.31)
"${build[@]}" --lib --test integration --no-run
"${build[@]}" --lib
"${build[@]}" --test integration -- tiny_model:: real_models:: camera_formats::
echo "arm64 test subset: $(($(date +%s) - start)) s"

# Same photos, both architectures, one model per output layout: the
# detections must match, scores within 1e-4 and boxes within 0.01 px.
for arch in x86_64 aarch64; do
    [[ -x target/$arch-unknown-linux-gnu/release/nanodetd ]] || cross/build.sh "$arch"
done
photos=("$assets"/samples/*.jpg "$assets"/samples/*.png)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for model in nanodet-plus-m_320 nanodet-m_320 nanodet-m-0.5x_320; do
    target/x86_64-unknown-linux-gnu/release/nanodetd detect --json \
        -m "$assets/models/$model.onnx" "${photos[@]}" >"$out/amd64.json"
    $runner target/aarch64-unknown-linux-gnu/release/nanodetd detect --json \
        -m "$assets/models/$model.onnx" "${photos[@]}" >"$out/arm64.json"
    python3 - "$model" "$out/amd64.json" "$out/arm64.json" <<'PY'
import json, sys
model, a, b = sys.argv[1], json.load(open(sys.argv[2])), json.load(open(sys.argv[3]))
assert len(a) > 0, f"{model}: no detections on amd64"
assert len(a) == len(b), f"{model}: {len(a)} detections on amd64, {len(b)} on arm64"
score = box = 0.0
for x, y in zip(a, b):
    assert (x["file_name"], x["category_id"]) == (y["file_name"], y["category_id"]), (x, y)
    score = max(score, abs(x["score"] - y["score"]))
    box = max(box, max(abs(p - q) for p, q in zip(x["bbox"], y["bbox"])))
assert score <= 1e-4, f"{model}: scores differ by {score}"
assert box <= 0.011, f"{model}: boxes differ by {box} px (the JSON rounds to 0.01)"
print(f"{model}: {len(a)} detections agree across amd64 and arm64 "
      f"(scores within {score:.1e}, boxes within {box:.2f} px)")
PY
done
echo "arm64 tests: $(($(date +%s) - start)) s"
