#!/usr/bin/env python3
"""The peers of `nanodetd bench-gpu --model`, in the same run on the same GPU.

1. Python onnxruntime-gpu (the same wheel whose libonnxruntime nanodetd
   loads): `session.run` from a host numpy tensor to host outputs, CUDA
   provider with its defaults; then the same with IOBinding (input and
   outputs on the device, outputs copied to the host) and a CUDA graph.
2. PyTorch: the same network, built op by op from the ONNX file (Conv,
   LeakyRelu, MaxPool, Resize, Split, Concat, Reshape, Transpose, Add,
   Sigmoid), run in FP32 and in FP16 replayed from a CUDA graph, input
   from pinned host memory and outputs back to pinned host memory.

None of them preprocesses a camera frame or decodes and NMSes the
outputs: they time inference only, a lower bound for a whole pipeline.
Prints one line per peer: name, median and p99 in microseconds.
"""

import argparse
import sys
import time

import numpy as np
import onnx
from onnx import numpy_helper


def quantiles(samples):
    s = np.sort(np.asarray(samples))
    return s[len(s) // 2] * 1e6, s[min(len(s) - 1, int(round((len(s) - 1) * 0.99)))] * 1e6


def report(name, samples, images=1):
    median, p99 = quantiles(samples)
    print(f"  {name:<52} {median:>10.1f} {p99:>10.1f} {images * 1e6 / median:>10.0f}", flush=True)


def timed(fn, iters, warmup):
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def onnxruntime_peers(model, x, iters, warmup):
    images = x.shape[0]
    import onnxruntime as ort

    print(f"onnxruntime {ort.__version__}, providers {ort.get_available_providers()}")
    sess = ort.InferenceSession(model, providers=["CUDAExecutionProvider"])
    if "CUDAExecutionProvider" not in sess.get_providers():
        sys.exit("onnxruntime-gpu did not start its CUDA provider")
    name = sess.get_inputs()[0].name
    ref = sess.run(None, {name: x})
    report("Python onnxruntime-gpu session.run (host in/out)",
           timed(lambda: sess.run(None, {name: x}), iters, warmup), images)

    x_dev = ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)
    outs = [ort.OrtValue.ortvalue_from_shape_and_type(o.shape, np.float32, "cuda", 0)
            for o in ref]
    for label, options in (
        ("IOBinding + CUDA graph", {"enable_cuda_graph": "1"}),
        ("IOBinding + CUDA graph + NHWC", {"enable_cuda_graph": "1", "prefer_nhwc": "1"}),
    ):
        bound = ort.InferenceSession(model, providers=[("CUDAExecutionProvider", options)])
        binding = bound.io_binding()
        binding.bind_ortvalue_input(name, x_dev)
        for o, v in zip(bound.get_outputs(), outs):
            binding.bind_ortvalue_output(o.name, v)

        def run_bound():
            bound.run_with_iobinding(binding)
            return [v.numpy() for v in outs]

        def run_on_device():
            bound.run_with_iobinding(binding)

        report(f"Python onnxruntime-gpu {label}", timed(run_bound, iters, warmup), images)
        if images > 1:
            # What the GPU computes, without the outputs' trip to the host
            # (run_with_iobinding waits for the run).
            report("  the same, outputs left on the device", timed(run_on_device, iters, warmup), images)
    return ref


class OnnxAsTorch:
    """The ONNX graph, node by node, as torch calls."""

    def __init__(self, model, torch, dtype, device):
        self.t = torch
        self.graph = onnx.load(model).graph
        self.consts = {
            i.name: numpy_helper.to_array(i) for i in self.graph.initializer
        }
        self.weights = {
            k: torch.from_numpy(v.copy()).to(device=device, dtype=dtype)
            for k, v in self.consts.items() if v.dtype == np.float32 and v.ndim >= 1
        }
        self.input = self.graph.input[0].name
        self.outputs = [o.name for o in self.graph.output]

    def __call__(self, x):
        t = self.t
        F = t.nn.functional
        env = {self.input: x}
        for n in self.graph.node:
            a = {at.name: onnx.helper.get_attribute_value(at) for at in n.attribute}
            i = [env.get(name, self.weights.get(name)) for name in n.input]
            op = n.op_type
            if op == "Conv":
                pads = a.get("pads", [0, 0, 0, 0])
                y = F.conv2d(i[0], i[1], i[2] if len(i) > 2 else None,
                             stride=a.get("strides", [1, 1]), padding=(pads[0], pads[1]),
                             dilation=a.get("dilations", [1, 1]), groups=a.get("group", 1))
            elif op == "LeakyRelu":
                y = F.leaky_relu(i[0], a.get("alpha", 0.01))
            elif op == "Relu":
                y = F.relu(i[0])
            elif op == "MaxPool":
                pads = a.get("pads", [0, 0, 0, 0])
                y = F.max_pool2d(i[0], a["kernel_shape"], a.get("strides"), (pads[0], pads[1]))
            elif op == "Resize":
                scales = self.consts[n.input[2]]
                y = F.interpolate(i[0], scale_factor=(float(scales[2]), float(scales[3])),
                                  mode="bilinear", align_corners=False)
            elif op == "Split":
                y = t.split(i[0], list(a["split"]), dim=a.get("axis", 0))
            elif op == "Concat":
                y = t.cat(i, dim=a["axis"])
            elif op == "Reshape":
                y = i[0].reshape([int(d) for d in self.consts[n.input[1]]])
            elif op == "Transpose":
                y = i[0].permute(a["perm"])
            elif op == "Add":
                y = i[0] + i[1]
            elif op == "Sigmoid":
                y = t.sigmoid(i[0])
            else:
                raise SystemExit(f"gpu_peer.py: no torch translation for ONNX op {op}")
            if isinstance(y, (tuple, list)):
                for name, v in zip(n.output, y):
                    env[name] = v
            else:
                env[n.output[0]] = y
        return [env[o] for o in self.outputs]


def torch_peers(model, x, ref, iters, warmup):
    try:
        import torch
    except ImportError:
        print("  PyTorch: not installed, skipped")
        return
    dev = torch.device("cuda")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
    torch.backends.cudnn.benchmark = True
    with torch.inference_mode():
        for dtype, label in ((torch.float32, "FP32"), (torch.float16, "FP16")):
            net = OnnxAsTorch(model, torch, dtype, dev)
            host_in = torch.from_numpy(x).pin_memory()
            dev_in = torch.empty(x.shape, device=dev, dtype=dtype)
            outs = net(dev_in.copy_(host_in))
            host_out = [torch.empty(o.shape, dtype=torch.float32).pin_memory() for o in outs]
            err = max(float(np.abs(o.float().cpu().numpy() - r).max()) for o, r in zip(outs, ref))
            print(f"  torch {label} vs onnxruntime: max abs output diff {err:.4f}")

            def eager():
                dev_in.copy_(host_in, non_blocking=True)
                for h, o in zip(host_out, net(dev_in)):
                    h.copy_(o, non_blocking=True)
                torch.cuda.synchronize()

            report(f"PyTorch {label} eager (pinned in -> pinned out)",
                   timed(eager, iters // 4, warmup))

            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3):
                    net(dev_in)
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                static_out = net(dev_in)

            def replay():
                dev_in.copy_(host_in, non_blocking=True)
                g.replay()
                for h, o in zip(host_out, static_out):
                    h.copy_(o, non_blocking=True)
                torch.cuda.synchronize()

            report(f"PyTorch {label} CUDA graph (pinned in -> pinned out)",
                   timed(replay, iters, warmup))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--iters", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--batch", type=int, default=1,
                   help="images a run, for a batchable model (bench-gpu --write-model)")
    args = p.parse_args()
    dims = onnx.load(args.model).graph.input[0].type.tensor_type.shape.dim
    # A batchable model's first axis is symbolic (dim_param, dim_value 0).
    shape = [d.dim_value or args.batch for d in dims]
    if shape[0] != args.batch:
        sys.exit(f"{args.model}: its input takes {shape[0]} images, not --batch {args.batch}")
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    print(f"{args.model}: input {shape}, {args.iters} timed runs after {args.warmup}")
    print(f"  {'peer':<52} {'median µs':>10} {'p99 µs':>10} {'images/s':>10}")
    ref = onnxruntime_peers(args.model, x, args.iters, args.warmup)
    if args.batch == 1:
        # Its graph is built for the file's batch-1 shapes.
        torch_peers(args.model, x, ref, args.iters, args.warmup)


if __name__ == "__main__":
    main()
