#!/usr/bin/env bash
# Release build of nanodetd for one target, linked by zig against glibc
# 2.31 (JetPack 5, Ubuntu 20.04) whatever this machine's glibc is, then
# checked: the ELF machine, the highest GLIBC symbol version, the size.
#
# Usage: cross/build.sh aarch64|x86_64 [cargo args...]
# The binary lands in target/<arch>-unknown-linux-gnu/release/nanodetd.
set -euo pipefail
cd "$(dirname "$0")/.."
arch=${1:?usage: cross/build.sh aarch64|x86_64 [cargo args...]}
shift
target=$arch-unknown-linux-gnu
floor=2.31
# Without default features: the demo's embedded broker stays out of the
# packaged binary (cross/README.md).
cargo zigbuild --release --no-default-features --target "$target.$floor" "$@"
binary=target/$target/release/nanodetd
case $arch in
aarch64) machine="ARM aarch64" ;;
x86_64) machine="x86-64" ;;
*) echo "cross/build.sh: unknown arch $arch" >&2 && exit 2 ;;
esac
described=$(file -b "$binary")
if ! grep -q "$machine" <<<"$described"; then
    echo "cross/build.sh: $binary is not an $machine ELF: $described" >&2
    exit 1
fi
needed=$(readelf -V "$binary" | grep -o 'GLIBC_[0-9.]*' | sort -Vu | tail -1)
if [[ $(printf '%s\n' "$needed" "GLIBC_$floor" | sort -V | tail -1) != "GLIBC_$floor" ]]; then
    echo "cross/build.sh: $binary needs $needed, above the GLIBC_$floor floor" >&2
    exit 1
fi
size=$(stat -c %s "$binary")
echo "$binary: $described"
echo "$binary: needs up to $needed; $((size / 1024)) KiB stripped"
