#!/usr/bin/env bash
# Quantization speed and peak memory: nanodetd quantize on the 80
# calibration images, and onnxruntime's quantize_static (the peer) on the
# same model and images in the same run, in TensorRT-compatible form
# (opset 13, QDQ, symmetric int8, per-channel weights, Conv only).
#   benches/quantize.sh [nanodetd binary]
# Needs python3 with onnx, onnxruntime, numpy, pillow, and GNU time.
set -euo pipefail
bin=${1:-target/release/nanodetd}
assets=${NANODETD_ASSETS:-../shared}
model=$assets/models/nanodet-plus-m_320.onnx
images=$assets/datasets/calibration-80
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
/usr/bin/time -f "nanodetd quantize (the default combination): %e s wall, %M KB peak RSS" \
    "$bin" quantize --model "$model" --calibration "$images" \
    --out "$work/default.onnx" 2>&1 >/dev/null | tail -1
alone=(--no-auto-float --no-threshold-choice --no-adaround --no-bias-correction)
for method in percentile entropy; do
    /usr/bin/time -f "nanodetd quantize --method $method ${alone[*]}: %e s wall, %M KB peak RSS" \
        "$bin" quantize --model "$model" --calibration "$images" --method "$method" \
        "${alone[@]}" --out "$work/$method.onnx" 2>&1 >/dev/null | tail -1
done
cat >"$work/peer.py" <<'PY'
import glob, sys
import numpy as np
import onnx
from onnx import version_converter
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod,
                                      QuantFormat, QuantType, quantize_static)
from PIL import Image

model, images, work = sys.argv[1:4]
mean = np.array([103.53, 116.28, 123.675], np.float32)
std = np.array([57.375, 57.12, 58.395], np.float32)

class Reader(CalibrationDataReader):
    def __init__(self):
        self.files = sorted(glob.glob(images + "/*.jpg"))
    def get_next(self):
        if not self.files:
            return None
        rgb = Image.open(self.files.pop(0)).convert("RGB").resize((320, 320), Image.BILINEAR)
        bgr = np.asarray(rgb, np.float32)[..., ::-1]
        return {"data": ((bgr - mean) / std).transpose(2, 0, 1)[None].copy()}

onnx.save(version_converter.convert_version(onnx.load(model), 13), work + "/m13.onnx")
quantize_static(work + "/m13.onnx", work + "/ort.onnx", Reader(),
                quant_format=QuantFormat.QDQ, op_types_to_quantize=["Conv"],
                per_channel=True, activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.Percentile,
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                               "QuantizeBias": False})
PY
/usr/bin/time -f "onnxruntime quantize_static (percentile): %e s wall, %M KB peak RSS" \
    python3 "$work/peer.py" "$model" "$images" "$work" 2>&1 >/dev/null | tail -1
