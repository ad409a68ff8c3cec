#!/usr/bin/env bash
# Proves the README's two commands on a fresh machine: a minimal Debian root
# (debootstrap --variant=minbase, plus build-essential, ca-certificates and
# git), a fresh clone of this repository's HEAD, and this machine's Rust
# toolchain, read-only. Inside, scripts/fresh-machine-inside.sh runs
# exactly the README's commands: the demo for 20 s, with a mosquitto_sub
# outside the root subscribed to its embedded broker, then the tests.
#
# Usage: scripts/fresh-machine.sh         (root; about 40 min on 2 cores)
# Env: FRESH_WORK (default target/fresh-machine), NANODETD_ASSETS (the
#      shared assets the tests read; default ../shared), FRESH_SUITE
#      (debootstrap suite, default bookworm), FRESH_SKIP_TESTS=1 (the demo
#      alone).
#
# Nothing is mounted on this machine: bubblewrap gives the root its own
# mount namespace, and every bind mount (toolchain, clone, assets, /proc,
# /dev) lives and dies there. debootstrap itself runs in a private mount
# namespace too (unshare), since it mounts /proc inside the root it builds.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${FRESH_WORK:-$repo/target/fresh-machine}
assets=$(realpath "${NANODETD_ASSETS:-$repo/../shared}")
suite=${FRESH_SUITE:-bookworm}
start=$(date +%s)
say() { echo "fresh-machine: $*"; }
die() { echo "fresh-machine: $*" >&2; exit 1; }

((EUID == 0)) || die "needs root (debootstrap, and apt-get inside the root)"
[[ -d $assets/models ]] || die "$assets has no models/ (set NANODETD_ASSETS)"
sysroot=$(rustc --print sysroot) || die "no Rust toolchain on PATH"
[[ -x $sysroot/bin/cargo ]] || die "$sysroot/bin/cargo is missing"

# --- Host tools: debootstrap and bubblewrap build and enter the root;
# mosquitto_sub subscribes from outside it.
need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v bwrap >/dev/null || need+=(bubblewrap)
command -v mosquitto_sub >/dev/null || need+=(mosquitto-clients)
command -v unshare >/dev/null || need+=(util-linux)
if ((${#need[@]})); then
    say "installing ${need[*]} on this machine"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
# The demo's embedded broker listens on 127.0.0.1:1883; the root shares
# this machine's network, so the port must be free here.
if (exec 3<>/dev/tcp/127.0.0.1/1883) 2>/dev/null; then
    die "127.0.0.1:1883 is taken on this machine; stop that broker first"
fi

# --- The root. debootstrap's output is kept as a tarball, so a later run
# starts from the same untouched root without downloading it again.
mkdir -p "$work"
root=$work/root
pristine=$work/debootstrap-$suite.tar
if [[ ! -f $pristine ]]; then
    say "debootstrap --variant=minbase $suite (build-essential, ca-certificates, git)"
    rm -rf "$work/build" && mkdir -p "$work/build"
    unshare --mount --propagation private -- \
        debootstrap --variant=minbase --include=build-essential,ca-certificates,git \
        "$suite" "$work/build" http://deb.debian.org/debian >"$work/debootstrap.log" 2>&1 ||
        { tail -20 "$work/debootstrap.log"; die "debootstrap failed (log: $work/debootstrap.log)"; }
    tar -C "$work/build" -cf "$pristine.tmp" . && mv "$pristine.tmp" "$pristine"
    rm -rf "$work/build"
fi
rm -rf "$root" && mkdir -p "$root"
tar -C "$root" -xf "$pristine"
say "fresh root at $root ($(du -sh "$root" | cut -f1)), $(($(date +%s) - start)) s"
# The registries are reached through this machine's CA bundle, and names
# through its resolver and hosts file (the root shares its network).
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
cp /etc/resolv.conf "$root/etc/resolv.conf"
# debootstrap writes no /etc/hosts, which every installed machine has: without
# it "localhost" (the daemon's default broker host) does not resolve.
cp /etc/hosts "$root/etc/hosts"
# The marker fresh-machine-inside.sh checks before it does anything.
echo "made by scripts/fresh-machine.sh" >"$root/etc/nanodetd-fresh-root"
mkdir -p "$root/work" "$root/opt/rust"
git clone --quiet --no-local "$repo" "$root/work/nanodetd"
say "cloned $(git -C "$root/work/nanodetd" log --oneline -1)"

# --- A subscriber outside the root, on the demo's broker (it retries
# until the daemon listens).
sub_log=$work/mosquitto_sub.log
: >"$sub_log"
(
    end=$((SECONDS + 3600))
    while ((SECONDS < end)); do
        mosquitto_sub -h 127.0.0.1 -p 1883 -t 'nanodetd/#' -v >>"$sub_log" 2>/dev/null || true
        sleep 1
    done
) &
subscriber=$!
# Its mosquitto_sub first, then the loop: a loop killed first leaves its
# mosquitto_sub to init, where `pkill -P` no longer finds it. Each command
# `|| true`: under `set -e` a failing kill in the trap (the subscriber is
# already gone once judged) made the script exit 1 after it had printed
# "passed".
stop_subscriber() {
    pkill -P "$subscriber" 2>/dev/null || true
    kill "$subscriber" 2>/dev/null || true
}
trap stop_subscriber EXIT

# --- Inside: only the toolchain, read-only, is added to the root.
# CI and the CA variables pass through; nothing else of this machine's
# environment does.
set +e
bwrap --bind "$root" / \
    --ro-bind "$sysroot" /opt/rust \
    --ro-bind "$assets" /work/shared \
    --proc /proc --dev /dev --perms 1777 --tmpfs /tmp --tmpfs /run \
    --unshare-pid --unshare-ipc --unshare-uts --hostname fresh \
    --die-with-parent --cap-add ALL \
    --chdir /work/nanodetd \
    --clearenv \
    --setenv PATH /opt/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --setenv HOME /root \
    --setenv CARGO_HOME /root/.cargo \
    --setenv LANG C.UTF-8 \
    --setenv CI "${CI:-true}" \
    --setenv NANODETD_FRESH_ROOT 1 \
    --setenv FRESH_SKIP_TESTS "${FRESH_SKIP_TESTS:-}" \
    --setenv SSL_CERT_FILE /etc/ssl/certs/ca-certificates.crt \
    --setenv PIP_CERT /etc/ssl/certs/ca-certificates.crt \
    --setenv CARGO_HTTP_CAINFO /etc/ssl/certs/ca-certificates.crt \
    bash scripts/fresh-machine-inside.sh 2>&1 | tee "$work/inside.log"
inside=${PIPESTATUS[0]}
set -e
stop_subscriber
sleep 0.5

# --- Judged here: the inside script's verdict, and the subscriber's view.
events=$(grep -c '^nanodetd/demo/demo/events .*"type":"new"' "$sub_log" || true)
say "mosquitto_sub outside the root received $events new events ($(wc -l <"$sub_log") messages)"
verdict=0
((inside == 0)) || { say "FAILED inside the root (exit $inside)"; verdict=1; }
for label in person cat cup "dining table"; do
    grep -q "^nanodetd/demo/demo/events .*\"label\":\"$label\"" "$sub_log" ||
        { say "FAILED: no $label event reached mosquitto_sub"; verdict=1; }
done
say "$( ((verdict == 0)) && echo passed || echo FAILED) in $(($(date +%s) - start)) s"
exit $verdict
