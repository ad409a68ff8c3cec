#!/usr/bin/env bash
# Builds a Python virtual environment with a real Home Assistant in it, to
# check nanodetd's MQTT discovery payloads against the real thing
# (tests/tools/ha_harness.py starts and drives it).
#
# Why Home Assistant 2024.3.3: it is the newest release that runs on Python
# 3.11 (this machine's CPython 3.11.7). Every release up to 2024.3.3 declares
# Requires-Python >=3.11.0; 2024.4.0 is the first that declares >=3.12.0
# (2024.3 only warns that 3.11 support is deprecated). The MQTT integration
# of 2024.3.3 requires paho-mqtt==1.6.1 (its manifest.json).
#
# Besides Home Assistant itself, the venv holds every requirement of every
# integration that `hass` sets up with the harness's configuration.yaml
# (http, api, config, mqtt) plus the ones it always sets up (frontend,
# backup, hardware, network, ... and their dependencies and
# after-dependencies, e.g. recorder), and of every entity platform the MQTT
# integration sets up (camera among them), so `hass --skip-pip` starts with
# no network and no "Setup failed" in its log. numpy is one more than Home
# Assistant itself would install: camera imports the stream integration,
# whose requirement it is, and fails to load without it.
#
# Every package is pinned, transitive ones included: those are the versions
# that were current when 2024.3.3 came out, constrained by its
# package_constraints.txt. Newer transitive ones break it: with josepy 2.x
# instead of 1.14.0, acme 2.8.0 fails to import, and so every HTTP request
# fails (the http integration's middleware imports hass_nabucasa, which
# imports acme).
#
# Usage: scripts/ha-venv.sh [VENV_DIR]   (default target/ha-venv)
# Idempotent: does nothing when VENV_DIR already has exactly this set.
# Needs python3 (3.11) and network access to PyPI on the first run.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-target/ha-venv}"
python="${PYTHON:-python3}"
ha_version=2024.3.3

requirements="$(cat <<'EOF'
homeassistant==2024.3.3
paho-mqtt==1.6.1
home-assistant-frontend==20240307.0
aiohttp-cors==0.7.0
aiohttp-fast-url-dispatcher==0.3.0
aiohttp-zlib-ng==0.3.1
fnv-hash-fast==0.5.0
ifaddr==0.2.0
janus==1.0.0
pillow==10.2.0
psutil-home-assistant==0.0.1
securetar==2024.2.1
SQLAlchemy==2.0.27
PyTurboJPEG==1.7.1
numpy==1.26.0
acme==2.8.0
aiohttp==3.9.3
aiooui==0.1.5
aiosignal==1.3.1
anyio==4.1.0
astral==2.2
async-interrupt==1.1.1
async-timeout==4.0.3
atomicwrites-homeassistant==1.4.1
attrs==23.2.0
awesomeversion==24.2.0
bcrypt==4.1.2
bleak==0.21.1
bleak-retry-connector==3.4.0
bluetooth-adapters==0.18.0
bluetooth-auto-recovery==1.3.0
bluetooth-data-tools==1.19.0
boto3==1.34.74
botocore==1.34.74
btsocket==0.2.0
certifi==2024.2.2
cffi==1.16.0
charset-normalizer==3.2.0
ciso8601==2.3.1
cryptography==42.0.5
dbus-fast==2.21.1
ecdsa==0.18.0
envs==1.4
fnvhash==0.1.0
frozenlist==1.4.1
greenlet==3.0.3
h11==0.14.0
habluetooth==2.4.2
hass-nabucasa==0.78.0
home-assistant-bluetooth==1.12.0
httpcore==1.0.4
httpx==0.27.0
idna==3.6
Jinja2==3.1.3
jmespath==1.0.1
josepy==1.14.0
lru-dict==1.3.0
MarkupSafe==2.1.5
multidict==6.0.5
orjson==3.9.15
packaging==24.0
psutil==5.9.8
pyasn1==0.6.0
pycognito==2023.5.0
pycparser==2.22
PyJWT==2.8.0
pyOpenSSL==24.0.0
pyRFC3339==1.1
PyRIC==0.1.6.3
python-dateutil==2.9.0.post0
python-jose==3.3.0
python-slugify==8.0.4
pytz==2024.1
PyYAML==6.0.1
requests==2.31.0
rsa==4.9
s3transfer==0.10.1
six==1.16.0
sniffio==1.3.1
snitun==0.36.2
text-unidecode==1.3
typing_extensions==4.10.0
ulid-transform==0.9.0
urllib3==1.26.18
usb-devices==0.4.5
voluptuous==0.13.1
voluptuous-serialize==2.6.0
yarl==1.9.4
zlib-ng==0.4.1
EOF
)"

# The stamp holds the requirements the venv was last completed with.
stamp="$venv/ha-venv-requirements.txt"
installed() {
    [[ -x "$venv/bin/python" && -x "$venv/bin/hass" && -f "$stamp" ]] || return 1
    [[ "$(cat "$stamp")" == "$requirements" ]] || return 1
    "$venv/bin/python" - "$ha_version" <<'PY' >/dev/null 2>&1
import sys
import hass_frontend, paho.mqtt
from homeassistant.const import __version__
sys.exit(__version__ != sys.argv[1] or paho.mqtt.__version__ != "1.6.1")
PY
}
if installed; then
    exit 0
fi

"$python" - <<'PY'
import sys
if not (3, 11) <= sys.version_info[:2] < (3, 13):
    sys.exit("scripts/ha-venv.sh: Home Assistant 2024.3.3 needs Python 3.11 "
             f"(or 3.12), not {sys.version.split()[0]}")
PY
[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
rm -f "$stamp"
printf '%s\n' "$requirements" >"$venv/requirements.in"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
    --requirement "$venv/requirements.in"
printf '%s' "$requirements" >"$stamp"
installed || {
    rm -f "$stamp"
    echo "scripts/ha-venv.sh: $venv does not import homeassistant $ha_version" \
        "and paho-mqtt 1.6.1 after the install" >&2
    exit 1
}
