#!/usr/bin/env bash
# Builds the amd64 and arm64 .deb files (cross/build.sh, then cargo deb
# --no-build) and checks each with cross/check-deb.sh: the amd64 one is
# installed into a throw-away root and run; the arm64 one too, except
# running its binary (cross/test-arm64.sh runs that under qemu).
#
# Usage: cross/package.sh       (root: dpkg --root, useradd --root)
set -euo pipefail
cd "$(dirname "$0")/.."
for arch in x86_64 aarch64; do
    cross/build.sh "$arch"
    cargo deb --target "$arch-unknown-linux-gnu" --no-build --no-strip --quiet
done
version=$(cargo metadata --no-deps --format-version 1 |
    python3 -c 'import json, sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"] == "nanodetd"))')
for debarch in amd64 arm64; do
    deb=$(ls target/debian/nanodetd_"$version"-*_"$debarch".deb)
    echo "$deb: $(du -h "$deb" | cut -f1)"
    cross/check-deb.sh "$deb"
done
