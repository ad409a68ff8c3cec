# Sourced by the bench scripts (benches/daemon.sh, benches/snapshots.sh): a
# work folder, removed with every background job on exit, and a mosquitto of
# the bench's own on a free loopback port. Sets $work and $port.
work=$(mktemp -d)
chmod 777 "$work"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
printf 'listener %s 127.0.0.1\nallow_anonymous true\n' "$port" > "$work/mosquitto.conf"
mosquitto -c "$work/mosquitto.conf" >/dev/null 2>&1 &
sleep 0.5
