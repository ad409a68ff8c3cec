#!/usr/bin/env bash
# What the metrics endpoint costs (issue 20; not a test): the detector's
# latency (stats.latency_ms of the one stats message, at shutdown: capture
# to the messages in the outbox, over the whole run; the mean exact, the
# percentiles read from histogram buckets) with [metrics] off and on, in one run, alternating off/on ROUNDS
# times so that a drift of the machine hits both alike. While it is on, a
# scraper fetches /metrics every SCRAPE_EVERY seconds (1: a tenth of the
# usual 10-15 s, the worst a sane Prometheus does) and times each scrape
# from the client's side; the size of the exposition is reported too.
#
#   benches/metrics.sh [ASSETS]     (ASSETS defaults to ../shared)
#   Env: ROUNDS (2), SECONDS_EACH (60), CAMERAS (16), FPS (1), SCRAPE_EVERY (1)
#
# Each camera replays four photos with people in a loop. Needs mosquitto
# and python3; builds the release binary. The figures go to
# docs/PERFORMANCE.md ("Metrics").
set -euo pipefail
cd "$(dirname "$0")/.."
assets=$(realpath "${1:-${NANODETD_ASSETS:-../shared}}")
rounds=${ROUNDS:-2} seconds=${SECONDS_EACH:-60} cameras=${CAMERAS:-16} fps=${FPS:-1}
every=${SCRAPE_EVERY:-1}
for tool in mosquitto mosquitto_sub python3; do
    type -P "$tool" >/dev/null || { echo "metrics bench: $tool is missing" >&2; exit 1; }
done
cargo build --release --quiet --bin nanodetd
source benches/broker.sh
mkdir -p "$work/frames"
for photo in hpc203_zidane.jpg hpc203_bus.jpg hpc203_person.jpg nanodet_000252.jpg; do
    cp "$assets/samples/$photo" "$work/frames/"
done
metrics_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')

run() { # mode (off|on) round
    local mode=$1 conf="$work/nanodetd.toml" stats="$work/stats-$1-$2.txt" scrapes="$work/scrapes-$1-$2.txt"
    cat > "$conf" <<TOML
[model]
path = "$assets/models/nanodet-plus-m_320.onnx"
[mqtt]
port = $port
prefix = "bench"
# One stats message, at shutdown: its latency_ms covers the whole run.
stats_interval = 86400
queue = 100000
TOML
    if [[ $mode == on ]]; then
        printf '[metrics]\nlisten = "127.0.0.1:%s"\n' "$metrics_port" >> "$conf"
    fi
    for i in $(seq 1 "$cameras"); do
        printf '[[camera]]\nname = "cam%s"\nsource = { folder = "%s/frames" }\nlooping = true\nfps = %s\n' \
            "$i" "$work" "$fps" >> "$conf"
    done
    : > "$scrapes"
    mosquitto_sub -p "$port" -t bench/stats > "$stats" &
    local sub=$!
    RUST_LOG=warn target/release/nanodetd run --config "$conf" &
    local pid=$!
    local scraper=
    if [[ $mode == on ]]; then
        python3 - "$metrics_port" "$every" "$scrapes" <<'PY' &
import sys, time, urllib.request
port, every, out = int(sys.argv[1]), float(sys.argv[2]), open(sys.argv[3], "a")
url = f"http://127.0.0.1:{port}/metrics"
while True:
    start = time.perf_counter()
    try:
        body = urllib.request.urlopen(url, timeout=5).read()
        out.write(f"{(time.perf_counter() - start) * 1e3:.3f} {len(body)}\n")
        out.flush()
    except OSError:
        pass  # the model is still loading, or the daemon has stopped
    time.sleep(max(0.0, every - (time.perf_counter() - start)))
PY
        scraper=$!
    fi
    sleep "$seconds"
    [[ -n $scraper ]] && kill "$scraper" && wait "$scraper" 2>/dev/null || true
    kill -TERM "$pid"
    wait "$pid"
    sleep 0.5
    kill "$sub" 2>/dev/null || true
    wait "$sub" 2>/dev/null || true
    python3 - "$mode" "$stats" "$scrapes" <<'PY'
import json, statistics, sys
mode, path, scrapes = sys.argv[1], sys.argv[2], sys.argv[3]
last = json.loads(open(path).read().strip().splitlines()[-1])
lat = last["latency_ms"]
fps = sum(c["frames"] - c["dropped"] for c in last["cameras"].values()) / last["uptime"]
times = sorted(float(l.split()[0]) for l in open(scrapes))
sizes = [int(l.split()[1]) for l in open(scrapes)]
if times:
    p99 = times[min(len(times) - 1, int(0.99 * len(times)))]
    scrape = f"{len(times)} | {statistics.median(times):.2f} | {p99:.2f} | {max(sizes)}"
else:
    scrape = "- | - | - | -"
print(f"| {mode} | {lat['total']['samples']} | {fps:.1f} | {lat['total']['mean']:.1f} | {lat['total']['p50']:.1f} | {lat['total']['p99']:.1f} "
      f"| {lat['inference']['p99']:.1f} | {lat['publish']['p99']:.2f} | {scrape} |")
PY
}

echo "machine: $(nproc) cores,$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
echo "$cameras cameras at $fps fps, nanodet-plus-m_320 on tract, $seconds s per run, a scrape every $every s when on"
echo
echo "| metrics | frames | frames/s | total mean (ms) | total p50 (ms) | total p99 (ms) | inference p99 (ms) | publish p99 (ms) | scrapes | scrape p50 (ms) | scrape p99 (ms) | bytes |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
for round in $(seq 1 "$rounds"); do
    run off "$round"
    run on "$round"
done
