#!/usr/bin/env bash
# The soak run of issue 17 (not in CI: 30 minutes): 16 replay cameras, the
# broker restarted every 5 minutes, a config edit every minute. It measures
# RSS growth after warm-up, events lost by seq, watchdog misses and each
# camera's processed rate; benches/soak.py has the details.
#
# Usage: benches/soak.sh      Env: SOAK_MINUTES (30), SOAK_CAMERAS (16),
#        NANODETD_ASSETS (default ../shared). Needs mosquitto and
#        mosquitto_sub; figures go to docs/RELIABILITY.md.
set -euo pipefail
cd "$(dirname "$0")/.."
assets=${NANODETD_ASSETS:-../shared}
for tool in mosquitto mosquitto_sub python3; do
    type -P "$tool" >/dev/null || { echo "soak: $tool is missing" >&2; exit 1; }
done
cargo build --release
exec python3 benches/soak.py target/release/nanodetd "$assets"
