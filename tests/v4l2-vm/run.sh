#!/usr/bin/env bash
# The V4L2 test: boots Debian's stock kernel under QEMU (software
# emulation, no KVM) with the vivid virtual camera driver, runs nanodetd
# against /dev/video0 inside (guest-init.sh), and judges what the VM wrote
# to its output disk (judge.py). Fails, with the console log, on anything
# missing: a module that will not load, a device that never appears, a
# format that does not convert, a VM that does not power off.
#
# Usage: tests/v4l2-vm/run.sh
# Needs root for the first run only (apt-get, when qemu-system-x86,
# busybox-static, cpio or kmod are missing). Builds nanodetd and the
# notify recorder (debug profile) if they are not built.
# Env: NANODETD_ASSETS (models; default ../shared), VM_WORK (default
# target/v4l2-vm), VM_TIMEOUT (seconds, default 170).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
work=${VM_WORK:-$repo/target/v4l2-vm}
assets=${NANODETD_ASSETS:-$repo/../shared}
timeout_s=${VM_TIMEOUT:-170}
start=$(date +%s)
mkdir -p "$work"

# --- Tools, through a private apt configuration (scripts/apt-private.sh).
source "$repo/scripts/apt-private.sh"
apt_private_init "$work/apt"
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
command -v cpio >/dev/null || need+=(cpio)
command -v depmod >/dev/null || need+=(kmod)
if ((${#need[@]})); then
    apt_private_install "${need[@]}"
fi

# --- Kernel and the vivid module chain, kept between runs (about 15 MB);
# the unpacked package (about 400 MB) is deleted.
kernel=$work/kernel
if [[ ! -f $kernel/ready ]]; then
    apt_private_update
    rm -rf "$kernel" && mkdir -p "$kernel/debs" "$kernel/modules"
    image=$(apt-cache "${apt_private[@]}" depends linux-image-amd64 |
        awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    (cd "$kernel/debs" && apt-get "${apt_private[@]}" download "$image" 2>/dev/null)
    dpkg-deb -x "$kernel"/debs/*.deb "$kernel/root"
    version=$(ls "$kernel/root/lib/modules")
    # The package ships no modules.dep.
    depmod -b "$kernel/root" "$version"
    cp "$kernel/root/boot/vmlinuz-$version" "$kernel/vmlinuz"
    # Load order: each module's dependencies (listed last-needed first in
    # modules.dep), then the module.
    dep=$kernel/root/lib/modules/$version/modules.dep
    : >"$kernel/modules/order"
    for wanted in virtio_pci virtio_blk vivid; do
        line=$(grep -E "/$wanted\.ko(\.[a-z]+)?:" "$dep")
        for ko in $(echo "${line#*:}" | tr ' ' '\n' | tac) "${line%%:*}"; do
            name=$(basename "$ko" | sed -E 's/\.ko(\.[a-z]+)?$//')
            grep -qx "$name" "$kernel/modules/order" && continue
            src=$kernel/root/lib/modules/$version/$ko
            case $ko in
            *.xz) xz -dc "$src" >"$kernel/modules/$name.ko" ;;
            *.zst) zstd -qdc "$src" >"$kernel/modules/$name.ko" ;;
            *) cp "$src" "$kernel/modules/$name.ko" ;;
            esac
            echo "$name" >>"$kernel/modules/order"
        done
    done
    echo "$version" >"$kernel/version"
    rm -rf "$kernel/root" "$kernel/debs"
    touch "$kernel/ready"
fi
echo "kernel $(cat "$kernel/version"), modules: $(tr '\n' ' ' <"$kernel/modules/order")"

# --- nanodetd and the notify recorder, as the test suite builds them.
(cd "$repo" && cargo build --quiet --bin nanodetd --example notify_recorder)
# The smallest model: emulated inference takes seconds a frame.
model=$assets/models/nanodet-m-0.5x_320.onnx
if [[ ! -f $model ]]; then
    echo "v4l2-vm: $model is missing (set NANODETD_ASSETS)" >&2
    exit 1
fi

# --- The initramfs: busybox, the modules, nanodetd, mosquitto and the
# libraries they link, the model, and guest-init.sh as /init.
root=$work/initramfs
rm -rf "$root" && mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,tmp,run,out,modules,models}
cp /bin/busybox "$root/bin/busybox"
cp "$kernel"/modules/*.ko "$kernel/modules/order" "$root/modules/"
cp "$model" "$root/models/"
strip -o "$root/bin/nanodetd" "$repo/target/debug/nanodetd"
cp "$repo/target/debug/examples/notify_recorder" "$root/bin/"
cp "$(command -v mosquitto)" "$(command -v mosquitto_sub)" "$root/bin/"
for binary in "$root"/bin/{nanodetd,notify_recorder,mosquitto,mosquitto_sub}; do
    for lib in $(ldd "$binary" | grep -oE '/[^ ]+\.so[^ ]*'); do
        mkdir -p "$root$(dirname "$lib")"
        cp -Ln "$lib" "$root$lib"
    done
done
printf 'root:x:0:0::/:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n' >"$root/etc/passwd"
printf 'root:x:0:\nvideo:x:44:\nnogroup:x:65534:\n' >"$root/etc/group"
cp "$here/guest-init.sh" "$root/init"
chmod +x "$root/init"
# guest-init.sh refuses to run where this marker is missing (a host).
touch "$root/nanodetd-v4l2-vm-guest"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) >"$work/initrd.img"
echo "initramfs: $(du -h "$work/initrd.img" | cut -f1)"

# --- Boot. The output disk is a bare tar archive the guest writes.
out=$work/out.img
rm -f "$out" && truncate -s 64M "$out"
console=$work/console.log
booted=$(date +%s)
set +e
# No AVX2 or FMA in the guest: tract then takes its SSE kernels. QEMU 10's TCG
# emulates FMA through software floating point, and with tract's FMA kernels
# one inference took long enough (2 frames in 20 s) to starve the detector's
# 8 s heartbeat, so the watchdog pings this test checks were withheld.
timeout "$timeout_s" qemu-system-x86_64 -accel tcg -cpu max,avx2=off,fma=off -m 1536 -smp 2 \
    -kernel "$kernel/vmlinuz" -initrd "$work/initrd.img" \
    -append 'console=ttyS0 quiet panic=-1' \
    -drive "file=$out,format=raw,if=virtio" \
    -nographic -nic none -no-reboot </dev/null >"$console" 2>&1
qemu_rc=$?
set -e
echo "VM ran $(($(date +%s) - booted)) s (qemu exit $qemu_rc)"
results=$work/results
rm -rf "$results" && mkdir -p "$results"
tar -xf "$out" -C "$results" 2>/dev/null || true
if ((qemu_rc != 0)); then
    echo "v4l2-vm: qemu exited with $qemu_rc (124: timed out after $timeout_s s)" >&2
fi
python3 "$here/judge.py" "$results" "$console" && verdict=0 || verdict=1
echo "v4l2-vm: $( ((verdict == 0)) && echo passed || echo FAILED) in $(($(date +%s) - start)) s"
exit $((verdict | (qemu_rc != 0)))
