"""INT8 fidelity of a NanoDet-Plus Q/DQ model against its FP32 source:
the three measures of ../shared/README.md, less noisy than a mAP drop on
~100 images.

  - score MAE over (prior, class) pairs where either score is > 0.05;
  - top-class agreement for priors whose FP32 best score is > 0.3;
  - decoded box-distance MAE (input pixels) for those priors.

usage: python3 tools/int8_fidelity.py FP32.onnx IMAGES_DIR INT8.onnx [...]

Needs onnxruntime, numpy and pillow. Both models see the same inputs
(PIL's bilinear stretch, NanoDet's BGR normalisation); onnxruntime runs
with graph optimizations off, i.e. the operators as ONNX defines them.
NanoDet-Plus layout only: one [1, priors, classes + 4 * 8] output.
"""
import glob
import os
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image

MEAN = np.array([103.53, 116.28, 123.675], np.float32)
STD = np.array([57.375, 57.12, 58.395], np.float32)
STRIDES = (8, 16, 32, 64)
BINS = 8


def session(path):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def main():
    fp32_path, images, *int8_paths = sys.argv[1:]
    fp32 = session(fp32_path)
    name = fp32.get_inputs()[0].name
    side = fp32.get_inputs()[0].shape[2]
    classes = fp32.get_outputs()[0].shape[2] - 4 * BINS
    strides = np.concatenate(
        [np.full(((side + s - 1) // s) ** 2, s) for s in STRIDES]
    )
    files = sorted(
        f for f in glob.glob(os.path.join(images, "*")) if f.lower().endswith((".jpg", ".jpeg", ".png"))
    )
    inputs = []
    for f in files:
        rgb = Image.open(f).convert("RGB").resize((side, side), Image.BILINEAR)
        bgr = np.asarray(rgb, np.float32)[..., ::-1]
        inputs.append(((bgr - MEAN) / STD).transpose(2, 0, 1)[None].copy())
    reference = [fp32.run(None, {name: x})[0][0] for x in inputs]

    def distances(out):
        logits = out[:, classes:].reshape(-1, 4, BINS)
        e = np.exp(logits - logits.max(-1, keepdims=True))
        e /= e.sum(-1, keepdims=True)
        return (e * np.arange(BINS)).sum(-1) * strides[:, None]

    for path in int8_paths:
        int8 = session(path)
        errors, agree, box = [], [], []
        for x, ref in zip(inputs, reference):
            out = int8.run(None, {name: x})[0][0]
            rs, qs = ref[:, :classes], out[:, :classes]
            errors.append(np.abs(rs - qs)[(rs > 0.05) | (qs > 0.05)])
            sure = rs.max(1) > 0.3
            agree.append(rs[sure].argmax(1) == qs[sure].argmax(1))
            box.append(np.abs(distances(ref) - distances(out))[sure].ravel())
        print(
            f"{path}: score MAE {np.concatenate(errors).mean():.4f}, "
            f"top-class agreement {100 * np.concatenate(agree).mean():.1f}%, "
            f"box-distance MAE {np.concatenate(box).mean():.2f} px "
            f"({len(inputs)} images)"
        )


main()
