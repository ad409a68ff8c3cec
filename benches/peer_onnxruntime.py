"""The peer for docs/PERFORMANCE.md: onnxruntime (Python, 1 thread)
session.run on a NanoDet model, median and p99 over N runs, printed as
JSON. Run by benches/compare.sh beside `nanodetd bench`."""
import json
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort

path, iters = sys.argv[1], int(sys.argv[2])
opts = ort.SessionOptions()
opts.intra_op_num_threads = 1
opts.inter_op_num_threads = 1
sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
inp = sess.get_inputs()[0]
x = np.random.default_rng(0).standard_normal(inp.shape).astype(np.float32)
for _ in range(5):
    sess.run(None, {inp.name: x})
times = []
for _ in range(iters):
    t = time.perf_counter()
    sess.run(None, {inp.name: x})
    times.append((time.perf_counter() - t) * 1e3)
times.sort()
print(json.dumps({
    "onnxruntime": ort.__version__,
    "median_ms": statistics.median(times),
    "p99_ms": times[min(len(times) - 1, round(0.99 * (len(times) - 1)))],
}))
