#!/bin/busybox sh
# /init of the V4L2 test VM (tests/v4l2-vm/run.sh builds the initramfs).
# Loads vivid, runs nanodetd against /dev/video0, and writes everything to
# /out, which goes to the virtio disk as a tar archive before power-off.
# It judges nothing itself: judge.py does, on the host, so a step that
# fails here still leaves its logs.

# Started anywhere else (a host, by mistake) it would mount over /tmp and
# /run, load kernel modules, overwrite /dev/vda and power the machine off.
# So it runs only as PID 1 of the initramfs run.sh builds, which alone has
# the marker file; the check uses shell builtins only.
if [ "$$" != 1 ] || [ ! -f /nanodetd-v4l2-vm-guest ]; then
    echo "guest-init.sh: refusing to run: this is the V4L2 test VM's /init, and runs only as PID 1 of its initramfs (this is PID $$)" >&2
    exit 64
fi
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mount -t tmpfs run /run
ip link set lo up

mark() { echo "$(cut -d' ' -f1 /proc/uptime) $*" | tee -a /out/events.log; }
finish() {
    mark "done"
    dmesg >/out/dmesg.log
    if [ -b /dev/vda ]; then
        tar -cf - -C /out . | dd of=/dev/vda bs=1M conv=fsync 2>/dev/null
    else
        echo "no /dev/vda: the results cannot leave the VM"
    fi
    poweroff -f
}

mark "boot"
for module in $(cat /modules/order); do
    insmod "/modules/$module.ko" || mark "insmod $module failed"
done
for _ in $(seq 50); do [ -e /dev/video0 ] && [ -b /dev/vda ] && break; sleep 0.1; done
[ -e /dev/video0 ] || { mark "no /dev/video0"; finish; }
mark "vivid loaded"

# 1. Each format nanodetd claims, at 640x480: what was negotiated, the
# measured rate, and one converted frame.
for format in yuyv uyvy nv12 rgb24 bgr24 grey; do
    nanodetd camera /dev/video0 --format "$format" --size 640x480 --fps 15 --refuse \
        --frames 30 --save "/out/$format.ppm" >"/out/camera-$format.json" 2>"/out/camera-$format.log"
    echo $? >"/out/camera-$format.rc"
done
mark "formats done"

# 1b. USERPTR streaming: the driver fills nanodetd's own buffers, which go
# out as the raw frames a GPU detector takes (--raw), converted here. YUYV
# asks for USERPTR; NV12 leaves it to "auto", which opens with mmap and
# switches when the first raw frame is wanted, as the daemon does when its
# detector is on a GPU.
for run in "yuyv userptr" "nv12 auto"; do
    set -- $run
    nanodetd camera /dev/video0 --format "$1" --size 640x480 --fps 15 --refuse \
        --io "$2" --raw --frames 30 --save "/out/userptr-$1.ppm" \
        >"/out/userptr-$1.json" 2>"/out/userptr-$1.log"
    echo $? >"/out/userptr-$1.rc"
done
# The driver goes while USERPTR buffers are queued: a clean error, no
# crash; then the driver is bound again for the steps below.
nanodetd camera /dev/video0 --format yuyv --size 640x480 --io userptr --raw --frames 100000 \
    >/out/userptr-unplug.json 2>/out/userptr-unplug.log &
camera=$!
sleep 3
echo vivid.0 >/sys/bus/platform/drivers/vivid/unbind || mark "unbind vivid (userptr) failed"
wait "$camera"
echo $? >/out/userptr-unplug.rc
echo vivid.0 >/sys/bus/platform/drivers/vivid/bind || mark "bind vivid failed"
for _ in $(seq 50); do [ -e /dev/video0 ] && break; sleep 0.1; done
mark "userptr done"

# 4. A format vivid lacks: negotiated away by default, refused on request.
nanodetd camera /dev/video0 --format mjpeg --frames 5 >/out/mjpeg-negotiate.json 2>/out/mjpeg-negotiate.log
echo $? >/out/mjpeg-negotiate.rc
nanodetd camera /dev/video0 --format mjpeg --frames 5 --refuse >/out/mjpeg-refuse.json 2>/out/mjpeg-refuse.log
echo $? >/out/mjpeg-refuse.rc

# 2 and 3. The daemon through MQTT, with vivid unplugged and replugged.
cat >/tmp/mosquitto.conf <<'EOF'
listener 1883 127.0.0.1
allow_anonymous true
user root
EOF
mosquitto -c /tmp/mosquitto.conf >/out/mosquitto.log 2>&1 &
sleep 0.5
mosquitto_sub -h 127.0.0.1 -v -t 'vm/#' >/out/mqtt.log 2>&1 &
notify_recorder /run/notify.sock >/out/notify.log 2>&1 &
cat >/tmp/nanodetd.toml <<'EOF'
device_id = "vivid"
[model]
path = "/models/nanodet-m-0.5x_320.onnx"
[mqtt]
host = "127.0.0.1"
prefix = "vm"
stats_interval = 1.0
reconnect_max = 1.0
[[camera]]
name = "cam"
source = { v4l2 = "/dev/video0" }
# vivid has no MJPEG: the daemon must negotiate another format and say so.
format = "mjpeg"
size = [640, 480]
EOF
sleep 0.5
mark "daemon start"
# Emulated inference takes seconds a frame, so the watchdog is longer than
# a real unit's would need to be.
NOTIFY_SOCKET=/run/notify.sock WATCHDOG_USEC=8000000 RUST_LOG=info \
    nanodetd run -c /tmp/nanodetd.toml 2>/out/daemon.log &
daemon=$!
# Until the camera is streaming through the detector (stats show fps).
for _ in $(seq 120); do
    grep -q '"state":"streaming","fps":[0-9.e-]*,"frames":[1-9]' /out/mqtt.log 2>/dev/null && break
    sleep 0.5
done
sleep 3
# Unbinding the driver is what a USB unplug does: the device goes while
# nanodetd holds it open. Only once nanodetd has let go can the module go
# too (rmmod refuses a module in use), so the replug is a fresh insmod.
mark "unplug"
echo vivid.0 >/sys/bus/platform/drivers/vivid/unbind || mark "unbind vivid failed"
sleep 3
rmmod vivid || mark "rmmod vivid failed"
sleep 3
mark "replug"
insmod /modules/vivid.ko || mark "insmod vivid failed"
# Back-off is at most a few seconds this early; wait for fresh frames.
sleep 12
mark "stop"
kill -TERM "$daemon"
wait "$daemon"
echo $? >/out/daemon.rc
sleep 0.5
finish
