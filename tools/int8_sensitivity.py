"""Which layer's INT8 input hurts most: quantizes one Conv input activation
at a time (every other Q/DQ pair, weights included, removed) and reports the SNR of the class scores
against FP32, worst first. A layer far below the rest is a candidate for
`keep_float`.

usage: python3 tools/int8_sensitivity.py FP32.onnx INT8.onnx IMAGES_DIR [N]

INT8.onnx is a model `nanodetd quantize` wrote from FP32.onnx. N images
(default 12) from IMAGES_DIR, stretched to the input size with PIL. Needs
onnx, onnxruntime, numpy and pillow. Takes a minute or two per model.
"""
import copy
import glob
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image

MEAN = np.array([103.53, 116.28, 123.675], np.float32)
STD = np.array([57.375, 57.12, 58.395], np.float32)


def main():
    fp32_path, int8_path, images = sys.argv[1:4]
    count = int(sys.argv[4]) if len(sys.argv) > 4 else 12
    model = onnx.load(int8_path)
    producer = {o: n for n in model.graph.node for o in n.output}
    readers = {}
    for n in model.graph.node:
        if n.op_type != "Conv":
            continue
        dq = producer.get(n.input[0])
        if dq is not None and dq.op_type == "DequantizeLinear":
            readers.setdefault(producer[dq.input[0]].input[0], []).append(n.name)

    options = ort.SessionOptions()
    options.log_severity_level = 3
    fp32 = ort.InferenceSession(fp32_path, options, providers=["CPUExecutionProvider"])
    name = fp32.get_inputs()[0].name
    side = fp32.get_inputs()[0].shape[2]
    classes = 80
    files = sorted(glob.glob(os.path.join(images, "*.jpg")))[:count]
    inputs = []
    for f in files:
        rgb = Image.open(f).convert("RGB").resize((side, side), Image.BILINEAR)
        bgr = np.asarray(rgb, np.float32)[..., ::-1]
        inputs.append(((bgr - MEAN) / STD).transpose(2, 0, 1)[None].copy())

    def scores(outputs):
        return np.concatenate(
            [o[..., :classes].ravel() for o in outputs if o.shape[-1] >= classes]
        )

    reference = [scores(fp32.run(None, {name: x})) for x in inputs]

    def snr(m):
        s = ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
        err = total = 0.0
        for x, r in zip(inputs, reference):
            o = scores(s.run(None, {name: x}))
            err += float(((o - r) ** 2).sum())
            total += float((r**2).sum())
        return 10 * np.log10(total / err) if err > 0 else float("inf")

    def only(tensor):
        m = copy.deepcopy(model)
        p = {o: n for n in m.graph.node for o in n.output}
        for n in m.graph.node:
            if n.op_type != "Conv":
                continue
            for i in (0, 1):
                dq = p.get(n.input[i])
                if dq is None or dq.op_type != "DequantizeLinear":
                    continue
                if p[dq.input[0]].input[0] != tensor:
                    n.input[i] = p[dq.input[0]].input[0]
        return m

    print(f"all layers quantized: {snr(model):.1f} dB")
    rows = sorted((snr(only(t)), t, readers[t]) for t in readers)
    for value, tensor, convs in rows[:12]:
        print(f"{value:5.1f} dB  input {tensor} of {', '.join(convs)}")


main()
