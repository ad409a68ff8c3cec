#!/usr/bin/env bash
# The daemon benchmark (not a test): the latency nanodetd adds from frame
# capture to the MQTT message at a subscriber, minus inference, and the
# daemon's peak RSS with one camera and with four.
#
#   benches/daemon.sh [ASSETS]     (ASSETS defaults to ../shared)
#
# Needs mosquitto. Builds the release binary and the probe example.
set -euo pipefail
cd "$(dirname "$0")/.."
assets=$(realpath "${1:-${NANODETD_ASSETS:-../shared}}")
cargo build --release --quiet --bin nanodetd --example latency_probe
source benches/broker.sh
mkdir -p "$work/frames"
cp "$assets/samples/hpc203_bus.jpg" "$assets/samples/skimage_chelsea.png" "$work/frames/"

run() { # cameras samples
    local cameras=$1 samples=$2 conf="$work/nanodetd-$1.toml"
    cat > "$conf" <<TOML
[model]
path = "$assets/models/nanodet-plus-m_320.onnx"
[mqtt]
port = $port
prefix = "bench"
detections_rate = 1000
stats_interval = 5
TOML
    for i in $(seq 1 "$cameras"); do
        printf '[[camera]]\nname = "cam%s"\nsource = { folder = "%s/frames" }\nlooping = true\nfps = %s\n' \
            "$i" "$work" "$((8 / cameras))" >> "$conf"
    done
    RUST_LOG=warn target/release/nanodetd run --config "$conf" &
    local pid=$!
    sleep 2
    echo "== $cameras camera(s), nanodet-plus-m_320, tract, $((8 / cameras)) fps each"
    target/release/examples/latency_probe "$port" 'bench/+/detections' "$samples"
    grep VmHWM "/proc/$pid/status"
    kill -TERM "$pid"; wait "$pid"
}
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
run 1 400
run 4 400
