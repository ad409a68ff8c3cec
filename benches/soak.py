#!/usr/bin/env python3
"""The soak run of issue 17 (benches/soak.sh runs it; not in CI).

16 replay cameras for SOAK_MINUTES (30), a mosquitto of its own restarted
every 5 minutes, a config edit every minute (a hot key, so no camera
restarts), the daemon under a notify socket with a watchdog. It reports:

- RSS growth after warm-up (the first 3 minutes), sampled every second: the
  median of the last window, less the median of the first window after
  warm-up (windows of 5 minutes, or a third of what follows the warm-up in
  a shorter run). RSS moves with the frames alive at a moment: the cameras
  show photos of 0.4 to 2.8 MB decoded, in step, so it swings by tens of
  MiB within each 20 s cycle once freed blocks go back to the OS. A window
  spans many cycles, and its median compares like with like; the peak and
  the first sample after warm-up are printed too;
- events lost, by `seq`, per camera: a seq never received, less those the
  daemon counted as dropped by a full outbox (`events_dropped`);
- watchdog misses: gaps between WATCHDOG=1 pings longer than WATCHDOG_USEC;
- each camera's processed rate (frames less dropped, a second).

It exits 1 if RSS grew more than 2 MiB, an event was lost or a ping missed.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

BIN = sys.argv[1]
ASSETS = os.path.realpath(sys.argv[2])
MINUTES = float(os.environ.get("SOAK_MINUTES", "30"))
CAMERAS = int(os.environ.get("SOAK_CAMERAS", "16"))
WARM_UP = min(180.0, MINUTES * 60 / 4)
WATCHDOG_USEC = 10_000_000
# Each photo is shown for 5 s (25 frames at 5 fps), so that objects become
# real and end even when overload leaves each camera 2 frames a second.
PHOTOS = ["hpc203_bus.jpg", "skimage_chelsea.png", "skimage_astronaut.png", "hpc203_zidane.jpg"]

work = tempfile.mkdtemp(prefix="nanodetd-soak-")
os.chmod(work, 0o777)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


port = free_port()
broker_conf = os.path.join(work, "mosquitto.conf")
with open(broker_conf, "w") as f:
    f.write(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
            f"persistence_location {work}/\nmax_queued_messages 1000000\n")


def start_broker():
    p = subprocess.Popen(["mosquitto", "-c", broker_conf],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(250):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return p
        except OSError:
            time.sleep(0.02)
    sys.exit("soak: mosquitto did not start")


broker = start_broker()

# A subscriber with a persistent session, so a broker restart loses nothing
# on its side.
received = os.path.join(work, "received.txt")
sub_out = open(received, "w")
subscriber = subprocess.Popen(
    ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-q", "1", "-c", "-i", "soak-sub",
     "-t", "soak/#", "-v"], stdout=sub_out, stderr=subprocess.DEVNULL)

photos = os.path.join(work, "photos")
os.mkdir(photos)
for i, name in enumerate(PHOTOS):
    shutil.copy(os.path.join(ASSETS, "samples", name), os.path.join(photos, f"{i:02}_{name}"))


def config(heartbeat):
    cams = "".join(
        f'[[camera]]\nname = "c{i:02}"\nsource = {{ folder = "{photos}" }}\n'
        f"looping = true\nrepeat = 25\nfps = 5\n" for i in range(CAMERAS))
    return (f'device_id = "soak"\n[model]\npath = "{ASSETS}/models/nanodet-plus-m_320.onnx"\n'
            f'[mqtt]\nport = {port}\nprefix = "soak"\nreconnect_max = 1.0\nstats_interval = 5.0\n'
            f"queue = 100000\n[tracker]\nlost_after = 0.6\nheartbeat = {heartbeat}\n{cams}")


config_path = os.path.join(work, "nanodetd.toml")


def write_config(text):
    tmp = config_path + ".new"
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, config_path)


write_config(config(60.0))

notify_path = os.path.join(work, "notify.sock")
notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
notify.bind(notify_path)
pings = []


def listen():
    while True:
        try:
            data = notify.recv(4096).decode(errors="replace")
        except OSError:
            return
        if "WATCHDOG=1" in data.splitlines():
            pings.append(time.monotonic())


threading.Thread(target=listen, daemon=True).start()

env = dict(os.environ, NOTIFY_SOCKET=notify_path, WATCHDOG_USEC=str(WATCHDOG_USEC),
           RUST_LOG="warn")
daemon_log = open(os.path.join(work, "daemon.log"), "w")
daemon = subprocess.Popen([BIN, "run", "--config", config_path], env=env,
                          stdout=subprocess.DEVNULL, stderr=daemon_log)


def rss():
    with open(f"/proc/{daemon.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


start = time.monotonic()
end = start + MINUTES * 60
samples = []
next_edit = start + 60
next_restart = start + 300
restarts = edits = 0
print(f"soak: {CAMERAS} cameras for {MINUTES} min, broker on {port}, work in {work}", flush=True)
rss_log = open(os.path.join(work, "rss.tsv"), "w")
while time.monotonic() < end:
    time.sleep(1)
    now = time.monotonic()
    if daemon.poll() is not None:
        sys.exit(f"soak: the daemon exited {daemon.returncode}; see {work}/daemon.log")
    samples.append((now - start, rss()))
    rss_log.write(f"{now - start:.1f}\t{samples[-1][1]}\n")
    rss_log.flush()
    if now >= next_edit:
        edits += 1
        write_config(config(60.0 + edits % 2))
        next_edit += 60
    if now >= next_restart:
        restarts += 1
        broker.send_signal(signal.SIGTERM)
        broker.wait()
        time.sleep(2)
        broker = start_broker()
        next_restart += 300

daemon.send_signal(signal.SIGTERM)
daemon.wait(timeout=30)
time.sleep(3)
subscriber.send_signal(signal.SIGTERM)
subscriber.wait()
broker.send_signal(signal.SIGTERM)
broker.wait()
sub_out.close()

seqs = {}
stats = None
heap = []  # (uptime, bytes malloc holds), from every stats message
with open(received) as f:
    for line in f:
        topic, _, payload = line.rstrip("\n").partition(" ")
        if topic.endswith("/events"):
            e = json.loads(payload)
            seqs.setdefault(e["camera"], set()).add(e["seq"])
        elif topic == "soak/stats":
            stats = json.loads(payload)
            in_use = stats.get("memory", {}).get("heap_in_use_bytes")
            if in_use is not None:
                heap.append((stats["uptime"], in_use))

duration = time.monotonic() - start
after = [(t, r) for t, r in samples if t >= WARM_UP]
window = min(300.0, (duration - WARM_UP) / 3)


def median(values):
    values = sorted(values)
    return values[len(values) // 2]


first_window = median([r for t, r in after if t < WARM_UP + window])
last_window = median([r for t, r in after if t >= duration - window])
growth = last_window - first_window
queued = stats["mqtt"]["events_queued"]
dropped = stats["mqtt"]["events_dropped"]
received_events = sum(len(s) for s in seqs.values())
missing = sum(max(s) + 1 - len(s) for s in seqs.values())
lost = missing - dropped
gaps = [b - a for a, b in zip(pings, pings[1:])]
misses = sum(1 for g in gaps if g > WATCHDOG_USEC / 1e6)
print(f"soak: {duration / 60:.1f} min, {restarts} broker restarts, {edits} config edits")
print(f"soak: RSS medians over {window:.0f} s: {first_window / 2**20:.1f} MiB after warm-up, "
      f"{last_window / 2**20:.1f} MiB at the end: growth {growth / 2**10:.0f} KiB")
print(f"soak: RSS first sample after warm-up {after[0][1] / 2**20:.1f} MiB, "
      f"peak {max(r for _, r in after) / 2**20:.1f} MiB, overall peak "
      f"{max(r for _, r in samples) / 2**20:.1f} MiB")
# RSS swings with the photos on show (each camera's frames are 0.4 to
# 2.8 MB), between levels a window's median can flip between: the lowest
# and highest samples of the same windows say whether the levels moved.
low = min(r for t, r in after if t < WARM_UP + window), min(r for t, r in after if t >= duration - window)
high = max(r for t, r in after if t < WARM_UP + window), max(r for t, r in after if t >= duration - window)
print(f"soak: RSS lowest {low[0] / 2**20:.1f} then {low[1] / 2**20:.1f} MiB, highest "
      f"{high[0] / 2**20:.1f} then {high[1] / 2**20:.1f} MiB (first and last windows)")
# What malloc holds, beside RSS: growth here is memory kept, where RSS
# alone cannot tell it from memory freed but still resident.
heap_after = [(t, b) for t, b in heap if t >= WARM_UP]
if heap_after:
    heap_first = median([b for t, b in heap_after if t < WARM_UP + window])
    heap_last = median([b for t, b in heap_after if t >= duration - window - 10])
    print(f"soak: heap in use (stats), medians over {window:.0f} s: {heap_first / 2**20:.1f} MiB after "
          f"warm-up, {heap_last / 2**20:.1f} MiB at the end: growth {(heap_last - heap_first) / 2**10:.0f} KiB")
medians = [f"{m} min {median([r for t, r in samples if m * 60 <= t < (m + 5) * 60]) / 2**20:.1f}"
           for m in range(0, int(duration // 60) - 4, 5)]
print("soak: RSS median of each 5 minutes (MiB): " + ", ".join(medians))
print(f"soak: events queued {queued}, received {received_events} distinct, "
      f"missing seqs {missing}, dropped by the outbox {dropped}, lost {lost}")
print(f"soak: {len(pings)} watchdog pings, longest gap {max(gaps):.2f} s, misses {misses}")
rates = []
for name, cam in sorted(stats["cameras"].items()):
    processed = (cam["frames"] - cam["dropped"]) / duration
    rates.append(processed)
    print(f"soak: camera {name}: {processed:.2f} frames/s processed, "
          f"{cam['frames']} captured, {cam['dropped']} dropped")
print(f"soak: processed rates {min(rates):.2f}..{max(rates):.2f} frames/s "
      f"(spread {(max(rates) - min(rates)) / max(rates) * 100:.1f}%)")
ok = growth <= 2 * 2**20 and lost == 0 and misses == 0
print("soak: " + ("passed" if ok else "FAILED"))
sys.exit(0 if ok else 1)
