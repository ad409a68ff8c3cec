"""Checks a nanodetd Q/DQ model with the ONNX project's own tools: it must
pass onnx.checker (full check, with shape inference), and onnxruntime must
compute the same outputs as tract did.

usage: qdq_ort_check.py MODEL INPUT.f32 H W TRACT_OUTPUT.f32 CLASSES

INPUT.f32 holds the [1, 3, H, W] input and TRACT_OUTPUT.f32 tract's first
output, both raw little-endian float32. onnxruntime runs the graph as the
ONNX spec defines each operator (optimizations off); its fused integer
path is measured too and reported. CLASSES is the number of leading
class-score columns of that output (NanoDet-Plus: [1, priors, classes +
32]). Prints one JSON line: the max abs difference on class scores, and on
the whole output.
"""
import json
import sys

import numpy as np
import onnx
import onnxruntime as ort

model_path, input_path, h, w, tract_path, classes = sys.argv[1:7]
h, w, classes = int(h), int(w), int(classes)

model = onnx.load(model_path)
onnx.checker.check_model(model, full_check=True)

x = np.fromfile(input_path, dtype="<f4").reshape(1, 3, h, w)


def run(level):
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    session = ort.InferenceSession(
        model_path, options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, {session.get_inputs()[0].name: x})[0]


# With graph optimizations off, onnxruntime computes each operator as the
# ONNX spec defines it: the reference for the graph's meaning. Its default
# level fuses DQ -> Conv -> LeakyRelu -> Q into integer QLinearConv
# kernels, a different (real INT8) computation, reported for information.
reference = run(ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
fused = run(ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
theirs = np.fromfile(tract_path, dtype="<f4").reshape(reference.shape)
diff = np.abs(reference - theirs)
fused_diff = np.abs(fused - theirs)
print(
    json.dumps(
        {
            "shape": list(reference.shape),
            "class_scores_max_abs_diff": float(diff[..., :classes].max()),
            "output_max_abs_diff": float(diff.max()),
            "class_scores_mean_abs_diff": float(diff[..., :classes].mean()),
            "class_scores_share_over_1e-3": float((diff[..., :classes] > 1e-3).mean()),
            "fused_int8_class_scores_max_abs_diff": float(
                fused_diff[..., :classes].max()
            ),
            # onnxruntime against itself: the unfused and the fused path.
            "onnxruntime_self_class_scores_max_abs_diff": float(
                np.abs(fused - reference)[..., :classes].max()
            ),
            "onnxruntime": ort.__version__,
            "onnx": onnx.__version__,
        }
    )
)
