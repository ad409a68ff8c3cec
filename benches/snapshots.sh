#!/usr/bin/env bash
# What snapshots cost the detector (issue 19; not a test): the daemon's own
# per-frame latency percentiles (stats.latency_ms, capture to messages in the
# outbox) with snapshots off and on, in one run, alternating off/on ROUNDS
# times so that a drift of the machine hits both alike.
#
#   benches/snapshots.sh [ASSETS]     (ASSETS defaults to ../shared)
#   Env: ROUNDS (2), SECONDS_EACH (60), CAMERAS (3), FPS (5)
#
# Each camera replays four photos of people in a loop, one second each; the
# photos differ in size, so every change is a new scene with new objects,
# and every person gets a snapshot: far more pictures than a real scene.
# Needs mosquitto and mosquitto_sub; builds the release binary. The figures
# go to docs/PERFORMANCE.md ("Snapshots").
set -euo pipefail
cd "$(dirname "$0")/.."
assets=$(realpath "${1:-${NANODETD_ASSETS:-../shared}}")
rounds=${ROUNDS:-2} seconds=${SECONDS_EACH:-60} cameras=${CAMERAS:-3} fps=${FPS:-5}
for tool in mosquitto mosquitto_sub python3; do
    type -P "$tool" >/dev/null || { echo "snapshots bench: $tool is missing" >&2; exit 1; }
done
cargo build --release --quiet --bin nanodetd
source benches/broker.sh
mkdir -p "$work/frames"
for photo in hpc203_zidane.jpg hpc203_bus.jpg hpc203_person.jpg nanodet_000252.jpg; do
    cp "$assets/samples/$photo" "$work/frames/"
done

run() { # mode (off|on) round
    local mode=$1 conf="$work/nanodetd.toml" stats="$work/stats-$1-$2.txt"
    local enabled=false
    [[ $mode == on ]] && enabled=true
    cat > "$conf" <<TOML
[model]
path = "$assets/models/nanodet-plus-m_320.onnx"
[mqtt]
port = $port
prefix = "bench"
# One stats message, at shutdown: its latency_ms covers the whole run.
stats_interval = 86400
queue = 100000
[snapshots]
enabled = $enabled
dir = "$work/snapshots"
TOML
    for i in $(seq 1 "$cameras"); do
        printf '[[camera]]\nname = "cam%s"\nsource = { folder = "%s/frames" }\nlooping = true\nfps = %s\nrepeat = %s\n' \
            "$i" "$work" "$fps" "$fps" >> "$conf"
    done
    mosquitto_sub -p "$port" -t bench/stats > "$stats" &
    local sub=$!
    RUST_LOG=warn target/release/nanodetd run --config "$conf" &
    local pid=$!
    sleep "$seconds"
    kill -TERM "$pid"
    wait "$pid"
    sleep 0.5
    kill "$sub" 2>/dev/null || true
    wait "$sub" 2>/dev/null || true
    python3 - "$mode" "$stats" <<'PY'
import json, sys
mode, path = sys.argv[1], sys.argv[2]
last = json.loads(open(path).read().strip().splitlines()[-1])
lat, snap = last["latency_ms"], last["snapshots"]
fps = sum(c["frames"] - c["dropped"] for c in last["cameras"].values()) / last["uptime"]
print(f"| {mode} | {lat['total']['samples']} | {fps:.1f} | {lat['total']['p50']:.1f} | {lat['total']['p99']:.1f} "
      f"| {lat['inference']['p99']:.1f} | {lat['publish']['p99']:.2f} | {snap['written']} | {snap['dropped']} |")
PY
}

echo "machine: $(nproc) cores,$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
echo "$cameras cameras at $fps fps, nanodet-plus-m_320 on tract, $seconds s per run"
echo
echo "| snapshots | frames | frames/s | total p50 (ms) | total p99 (ms) | inference p99 (ms) | publish p99 (ms) | pictures written | dropped |"
echo "|---|---|---|---|---|---|---|---|---|"
for round in $(seq 1 "$rounds"); do
    run off "$round"
    run on "$round"
done
