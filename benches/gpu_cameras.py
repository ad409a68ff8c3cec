#!/usr/bin/env python3
"""Issue 21's benchmark: many cameras on one GPU, batch 1 against batched.

Runs `nanodetd run` with N synthetic cameras (one photo as 1920x1080 YUYV
frames at 30 fps each, paced by the clock like live cameras, lent to the
GPU without a host copy) on ONNX Runtime's CUDA provider, for each camera
count, precision and batch size asked. Each run waits for /readyz, lets
the CUDA graphs be captured, then measures a window between two scrapes of
the daemon's own /metrics:

- frames/s detected (nanodetd_detection_latency_seconds' count over the
  window), frames offered, frames dropped (replaced before the detector
  took them) and each camera's share;
- p50/p99 capture -> detections in the outbox (that histogram) and
  capture -> event at the broker (nanodetd_event_latency_seconds, which
  counts only frames that made an event), interpolated in the buckets as
  Prometheus' histogram_quantile does;
- the mean batch (nanodetd_batch_size) and each stage's mean time
  (nanodetd_stage_duration_seconds): the inference of a run (each frame
  carries its run's time, so this mean weighs runs by size; it includes
  waiting for the frames' uploads, which preprocessing only queues), and
  the wait, preprocessing, decoding and publishing of a frame;
- GPU busy: nvidia-smi's utilization.gpu (the share of time a kernel ran),
  sampled every 100 ms over the window.

Prints one markdown row per run. Used by scripts/gpu-bench.sh cameras.
"""

import argparse
import math
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$')
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url, timeout=5):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""
    except OSError:
        return None, ""


def scrape(port):
    """Samples of the text format: {(name, frozenset(labels)): value}."""
    status, text = get(f"http://127.0.0.1:{port}/metrics")
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}")
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = SAMPLE.match(line)
        if m:
            labels = frozenset(LABEL.findall(m.group(2) or ""))
            samples[(m.group(1), labels)] = float(m.group(3))
    return time.monotonic(), samples


def total(samples, name, **want):
    """Sum of `name`'s samples whose labels include `want`."""
    return sum(v for (n, labels), v in samples.items()
               if n == name and all((k, w) in labels for k, w in want.items()))


def by_label(samples, name, label, **want):
    out = {}
    for (n, labels), v in samples.items():
        d = dict(labels)
        if n == name and all(d.get(k) == w for k, w in want.items()):
            out[d.get(label)] = out.get(label, 0.0) + v
    return out


def buckets(before, after, name):
    """The histogram's cumulative bucket counts over the window, by bound."""
    b0 = by_label(before, name + "_bucket", "le")
    b1 = by_label(after, name + "_bucket", "le")
    return sorted((float(le), b1[le] - b0.get(le, 0.0)) for le in b1)


def quantile(q, cumulative):
    """histogram_quantile: linear within the bucket the rank falls in."""
    if not cumulative or cumulative[-1][1] <= 0:
        return math.nan
    rank = q * cumulative[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in cumulative:
        if count >= rank:
            if math.isinf(bound):
                return lower
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def gpu_sampler(samples, stop):
    try:
        proc = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "100"],
            stdout=subprocess.PIPE, text=True)
    except OSError:
        return  # no GPU here: the column stays empty
    try:
        for line in proc.stdout:
            if stop.is_set():
                break
            try:
                samples.append(float(line.strip()))
            except ValueError:
                pass
    finally:
        proc.terminate()
        proc.wait()


def config(args, work, cameras, precision, batch, fps, metrics_port, mqtt_port):
    lines = [
        "[model]",
        f'path = "{args.model}"',
        'backend = "onnxruntime"',
        f'precision = "{precision}"',
        f'cache = "{work}/cache"',
        "[model.onnxruntime]",
        'provider = "cuda"',
        f"max_batch = {batch}",
        "[batching]",
        f"max_batch = {batch}",
        f"wait = {args.wait}",
        "[capture]",
        # 128 cameras x 1920x1080 is 265 Mpx, above the default total.
        f"max_pixels_total = {1 << 30}",
        "[mqtt]",
        f"port = {mqtt_port}",
        "embedded_broker = true",
        'prefix = "bench"',
        "stats_interval = 3600",
        "queue = 100000",
        "[metrics]",
        f'listen = "127.0.0.1:{metrics_port}"',
        "stale_after = 3600",
    ]
    for i in range(cameras):
        lines += [
            "[[camera]]",
            f'name = "cam{i:03}"',
            f'source = {{ synthetic = "{args.photo}" }}',
            'format = "yuyv"',
            "size = [1920, 1080]",
            f"fps = {fps}",
        ]
        if args.blink:
            lines.append(f"blink = {args.blink}")
    path = os.path.join(work, "nanodetd.toml")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def one_run(args, work, cameras, precision, batch, fps):
    metrics_port, mqtt_port = free_port(), free_port()
    path = config(args, work, cameras, precision, batch, fps, metrics_port, mqtt_port)
    log_path = os.path.join(work, f"log-{cameras}-{precision}-{batch}-{fps}.txt")
    env = dict(os.environ, RUST_LOG="info")
    with open(log_path, "w") as log:
        daemon = subprocess.Popen([args.nanodetd, "run", "--config", path],
                                  stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        # Ready (/readyz) once the model is in service; the first runs may
        # still be slow (a CUDA graph's capture, or a session that ran each
        # batch size when it was made: 19 s for max_batch 32 on the H100
        # once), so the warm-up starts at the first frames detected.
        deadline = time.monotonic() + args.load_timeout
        while True:
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"no frame detected (exit {daemon.poll()}); see {log_path}")
            if get(f"http://127.0.0.1:{metrics_port}/readyz", timeout=1)[0] == 200:
                _, now = scrape(metrics_port)
                if total(now, "nanodetd_detection_latency_seconds_count") > 0:
                    break
            time.sleep(0.2)
        time.sleep(args.warmup)
        gpu, stop = [], threading.Event()
        sampler = threading.Thread(target=gpu_sampler, args=(gpu, stop), daemon=True)
        sampler.start()
        t0, before = scrape(metrics_port)
        time.sleep(args.seconds)
        t1, after = scrape(metrics_port)
        stop.set()
    finally:
        daemon.terminate()
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
    span = t1 - t0
    delta = lambda name, **w: total(after, name, **w) - total(before, name, **w)  # noqa: E731
    detected = delta("nanodetd_detection_latency_seconds_count")
    offered = delta("nanodetd_camera_frames_total")
    dropped = delta("nanodetd_camera_frames_dropped_total", reason="replaced")
    broken = delta("nanodetd_camera_frames_dropped_total", reason="broken")
    per_camera = []
    f0 = by_label(before, "nanodetd_camera_frames_total", "camera")
    f1 = by_label(after, "nanodetd_camera_frames_total", "camera")
    r0 = by_label(before, "nanodetd_camera_frames_dropped_total", "camera", reason="replaced")
    r1 = by_label(after, "nanodetd_camera_frames_dropped_total", "camera", reason="replaced")
    for cam in f1:
        per_camera.append((f1[cam] - f0.get(cam, 0)) - (r1.get(cam, 0) - r0.get(cam, 0)))
    mean_cam = sum(per_camera) / max(1, len(per_camera))
    spread = (max(per_camera) - min(per_camera)) / mean_cam * 100 if mean_cam > 0 else math.nan
    latency = buckets(before, after, "nanodetd_detection_latency_seconds")
    events = buckets(before, after, "nanodetd_event_latency_seconds")
    runs = delta("nanodetd_batch_size_count")
    mean_batch = delta("nanodetd_batch_size_sum") / runs if runs else math.nan
    def stage(name):
        return (delta("nanodetd_stage_duration_seconds_sum", stage=name)
                / max(1.0, delta("nanodetd_stage_duration_seconds_count", stage=name)))
    inference = stage("inference")
    notes = []
    with open(log_path) as log:
        for line in log:
            if any(k in line for k in ("engine:", "batching:", "ONNX Runtime CUDA", "ERROR", "WARN")):
                notes.append(line.strip())
    ms = lambda s: f"{s * 1e3:.1f}"  # noqa: E731
    gpu_busy = f"{sum(gpu) / len(gpu):.0f}" if gpu else "-"
    row = (f"| {cameras} | {fps} | {precision} | {batch} | {detected / span:.0f} | {offered / span:.0f} "
           f"| {dropped / max(1.0, offered) * 100:.2f} | {int(broken)} | {spread:.1f} "
           f"| {ms(quantile(0.5, latency))} | {ms(quantile(0.99, latency))} "
           f"| {ms(quantile(0.5, events))} | {ms(quantile(0.99, events))} | {int(events[-1][1]) if events else 0} "
           f"| {mean_batch:.1f} | {stage('queue') * 1e3:.2f} | {stage('preprocess') * 1e3:.3f} "
           f"| {inference * 1e3:.2f} | {stage('postprocess') * 1e3:.3f} | {stage('publish') * 1e3:.3f} | {gpu_busy} |")
    return row, notes


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--nanodetd", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--photo", required=True)
    p.add_argument("--cameras", default="1,4,16,64,128")
    p.add_argument("--blink", type=int, default=0,
                   help="frames each camera shows its photo, then a black frame, over and "
                        "over, so objects come and go and capture->event latency is measured "
                        "(0: the photo always)")
    p.add_argument("--precisions", default="fp32,fp16")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--fps", type=int, default=30)
    p.add_argument("--extra", default="",
                   help="more runs, as cameras:fps:precision:batch separated by commas")
    p.add_argument("--wait", type=float, default=0.002)
    p.add_argument("--warmup", type=float, default=4.0)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--load-timeout", type=float, default=120.0)
    args = p.parse_args()
    args.model = os.path.abspath(args.model)
    args.photo = os.path.abspath(args.photo)
    runs = [(int(c), args.fps, pr, int(b))
            for pr in args.precisions.split(",")
            for b in args.batches.split(",")
            for c in args.cameras.split(",")]
    for extra in filter(None, args.extra.split(",")):
        c, f, pr, b = extra.split(":")
        runs.append((int(c), int(f), pr, int(b)))
    print(f"{len(runs)} runs: {args.warmup:g} s warm-up, {args.seconds:g} s measured each; "
          f"1920x1080 YUYV synthetic cameras; batching.wait {args.wait:g} s"
          + (f"; blinking every {args.blink} frames" if args.blink else ""))
    print("| cameras | fps each | precision | max batch | detected/s | offered/s | dropped % | broken "
          "| camera spread % | capture->detections p50 (ms) | p99 (ms) | capture->event p50 (ms) "
          "| p99 (ms) | events | mean batch | queue (ms) | preprocess a frame (ms) | inference a run (ms) "
          "| postprocess a frame (ms) | publish a frame (ms) | GPU busy % |")
    print("|" + "---|" * 21)
    failed = 0
    seen_notes = set()
    with tempfile.TemporaryDirectory(prefix="nanodetd-cameras-") as work:
        for cameras, fps, precision, batch in runs:
            try:
                row, notes = one_run(args, work, cameras, precision, batch, fps)
                print(row, flush=True)
                for note in notes:
                    key = re.sub(r"^\S+\s+\S+\s+", "", note)
                    if key not in seen_notes:
                        seen_notes.add(key)
                        print(f"    {note}", file=sys.stderr, flush=True)
            except Exception as e:  # one failed run must not lose the others
                failed = 1
                print(f"| {cameras} | {fps} | {precision} | {batch} | failed: {e} |", flush=True)
    sys.exit(failed)


if __name__ == "__main__":
    main()
