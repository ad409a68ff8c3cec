#!/usr/bin/env bash
# Fetches a real libonnxruntime of an API level older than the one nanodetd
# is built for, so the onnxruntime backend's refusal of it can be tested
# (tests/integration/onnxruntime.rs). PyPI's own onnxruntime wheels before 1.17 ship no
# libonnxruntime.so (the C API is linked into the Python module, unexported),
# but piper-phonemize 1.1.0 bundles ONNX Runtime 1.14.1 as a shared library.
#
# Usage: scripts/old-onnxruntime.sh [DIR]   (default target/old-onnxruntime)
# Prints the library's path. Needs pip and network access to PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-target/old-onnxruntime}"
library="$dir/libonnxruntime.so.1.14.1"
if [[ -f "$library" ]]; then
    echo "$library"
    exit 0
fi
wheel=piper_phonemize-1.1.0-cp311-cp311-manylinux_2_28_x86_64.whl
sha256=c1062e00c94835e9115df7ce1d7b3b5c40c6d845cd70b2c121954faf5b8d23c7
mkdir -p "$dir"
python3 -m pip download --quiet --disable-pip-version-check --no-deps \
    --only-binary=:all: --python-version 3.11 --platform manylinux_2_28_x86_64 \
    --dest "$dir" piper-phonemize==1.1.0 >&2
echo "$sha256  $dir/$wheel" | sha256sum --check --quiet
python3 - "$dir/$wheel" "$library" <<'PY'
import shutil, sys, zipfile
wheel, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    [name] = [n for n in z.namelist() if "libonnxruntime" in n and n.endswith(".so.1.14.1")]
    with z.open(name) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
rm "$dir/$wheel"
echo "$library"
