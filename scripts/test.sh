#!/usr/bin/env bash
# The README's test command. Installs what the test suite needs beyond a
# Rust toolchain and a C compiler, then runs `cargo test` (arguments go to
# it: scripts/test.sh --test daemon). `scripts/test.sh --setup-only` installs
# and stops there (.ci/run installs while it builds).
#
# - Programs the tests run (mosquitto, openssl, systemd-analyze, prometheus,
#   ffmpeg, GStreamer's RTSP server, ...): only what is missing is installed, with apt-get, as root or
#   through sudo, and the script says what and why before it does. Without either it prints
#   the apt-get line to run and stops.
# - Python packages (pycocotools, onnx, onnxruntime, numpy): into a virtual
#   environment under target/test-venv, never into the system's Python. Its
#   bin/ comes first on PATH for the tests, which run `python3`.
# - Home Assistant 2024.3.3 in target/ha-venv (scripts/ha-venv.sh), which
#   the discovery test starts on its own broker.
# - A real ONNX Runtime 1.14.1 library, which the onnxruntime tests must
#   refuse (scripts/old-onnxruntime.sh).
#
# The real models and images come from ../shared, or NANODETD_ASSETS. With
# CI set, a test whose tool or asset is missing fails and names it;
# without, it is skipped with a SKIPPED line.
set -euo pipefail
cd "$(dirname "$0")/.."

# --- Programs: command -> Debian package.
declare -A package=(
    [mosquitto]=mosquitto
    [mosquitto_passwd]=mosquitto
    [mosquitto_sub]=mosquitto-clients
    [openssl]=openssl
    [systemd-analyze]=systemd
    [chattr]=e2fsprogs
    # systemd-analyze verify checks the unit's ExecReload=/bin/kill.
    [kill]=procps
    [python3]=python3
    [cc]=gcc
    # A real Prometheus scrapes the daemon; promtool lints /metrics and
    # unit-tests the alert rules (tests/integration/metrics.rs).
    [prometheus]=prometheus
    [promtool]=prometheus
)
need=()
# type -P: the program on PATH, which the tests spawn; `command -v` would
# also accept a shell builtin (kill is one).
for tool in "${!package[@]}"; do
    type -P "$tool" >/dev/null 2>&1 || need+=("${package[$tool]}")
done
# IP cameras (tests/integration/rtsp.rs): ffmpeg makes the H.264 and H.265
# clips from the sample photos; GStreamer's RTSP server serves them, run
# with Debian's Python, which has the GObject bindings (h264parse and
# h265parse come with gst-rtsp-server's dependencies).
type -P ffmpeg >/dev/null 2>&1 || need+=(ffmpeg)
if ! /usr/bin/python3 -c "import gi; gi.require_version('GstRtspServer', '1.0'); from gi.repository import GstRtspServer" 2>/dev/null; then
    need+=(gir1.2-gst-rtsp-server-1.0 python3-gst-1.0 gstreamer1.0-plugins-bad gstreamer1.0-plugins-good)
fi
# The V4L2 layout test compiles against the kernel's header.
[[ -f /usr/include/linux/videodev2.h ]] || need+=(linux-libc-dev)
# The virtual environment: Debian splits venv and ensurepip out of python3.
if ! type -P python3 >/dev/null 2>&1 || ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    need+=(python3-venv)
fi
if ((${#need[@]})); then
    mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
    echo "scripts/test.sh: the tests need these Debian packages, which are missing: ${need[*]}"
    if ((EUID == 0)); then
        sudo=()
    elif command -v sudo >/dev/null 2>&1; then
        echo "scripts/test.sh: installing them with sudo apt-get"
        sudo=(sudo)
    else
        echo "scripts/test.sh: run as root, or install them first:" >&2
        echo "  apt-get install --no-install-recommends ${need[*]}" >&2
        exit 1
    fi
    echo "scripts/test.sh: apt-get install --no-install-recommends ${need[*]}"
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

# --- Python packages, in a virtual environment of the tests' own.
venv=target/test-venv
python_packages=(numpy pycocotools onnx onnxruntime)
if ! "$venv/bin/python3" -c 'import numpy, pycocotools, onnx, onnxruntime' 2>/dev/null; then
    echo "scripts/test.sh: installing ${python_packages[*]} into $venv (pip)"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/python3" -m pip install --quiet --disable-pip-version-check "${python_packages[@]}"
fi
export PATH="$PWD/$venv/bin:$PATH"

# --- A real Home Assistant, in a venv of its own (its pinned packages would
# clash with the ones above), for the MQTT discovery test.
scripts/ha-venv.sh

# --- An older libonnxruntime, which the onnxruntime backend must refuse.
scripts/old-onnxruntime.sh

[[ ${1:-} == --setup-only ]] && exit 0

# --no-fail-fast: one failing target must not hide the others' results.
exec cargo test --no-fail-fast "$@"
