#!/usr/bin/env bash
# Installs what the cross build, the packages and the arm64 tests need,
# each only if missing: the rustup targets, zig and cargo-zigbuild (PyPI),
# cargo-deb (crates.io), and qemu-user with Debian's arm64 C library for
# running aarch64 binaries here (apt, private configuration; needs root).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)

installed=$(rustup target list --installed)
for target in aarch64-unknown-linux-gnu x86_64-unknown-linux-gnu; do
    grep -qx "$target" <<<"$installed" || rustup target add "$target"
done
if ! command -v cargo-zigbuild >/dev/null || ! python3 -m ziglang version >/dev/null 2>&1; then
    python3 -m pip install --quiet --disable-pip-version-check ziglang cargo-zigbuild
fi
# pip's script directory may not be on PATH (a user install, a venv): link
# cargo-zigbuild beside cargo, which is. It finds zig through `python3 -m
# ziglang` by itself.
if ! command -v cargo-zigbuild >/dev/null; then
    scripts=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
    ln -sf "$scripts/cargo-zigbuild" "$(dirname "$(command -v cargo)")/cargo-zigbuild"
fi
command -v cargo-deb >/dev/null || cargo install --quiet --locked cargo-deb

need=()
command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
[[ -e /usr/aarch64-linux-gnu/lib/libc.so.6 ]] || need+=(libc6-arm64-cross)
[[ -e /usr/aarch64-linux-gnu/lib/libgcc_s.so.1 ]] || need+=(libgcc-s1-arm64-cross)
command -v file >/dev/null || need+=(file)
if ((${#need[@]})); then
    source "$repo/scripts/apt-private.sh"
    apt_private_init "$repo/target/apt-private"
    apt_private_install "${need[@]}"
fi
echo "cross setup: $(cargo-zigbuild --version), zig $(python3 -m ziglang version), $(cargo deb --version | head -1), $(qemu-aarch64 --version | head -1)"
