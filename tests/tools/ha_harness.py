"""Starts and drives a real Home Assistant (the venv of scripts/ha-venv.sh)
so nanodetd's MQTT discovery can be checked against the real consumer.
Standard library only; run it with the HA venv's python, whose bin/ holds
`hass`.

usage:
  ha_harness.py start --config DIR --port HTTP_PORT --mqtt-port MQTT_PORT
                      [--hass PATH] [--timeout SECONDS]
  ha_harness.py get --url URL --token TOKEN PATH
  ha_harness.py devices --url URL --token TOKEN
  ha_harness.py stop --pid PID [--timeout SECONDS]

start writes DIR/configuration.yaml (http on 127.0.0.1:HTTP_PORT, api,
config; Home Assistant always adds frontend and the rest of its built-in
set), starts `hass -c DIR --skip-pip` in a process group of its own with
its output in DIR/hass.log, creates the owner user through the onboarding
API (on a DIR this harness onboarded before, it logs in with the
credentials it kept in DIR/.ha-harness-credentials.json), makes a
long-lived access token, replaces any MQTT config entry with one for the
broker at 127.0.0.1:MQTT_PORT through the config-flow API (removing the
old entry's devices and entities; retained discovery messages bring them
back), waits for that entry to be loaded, for a message published through
Home Assistant to come back from the broker and for Home Assistant's
birth message (homeassistant/status "online"; not retained in this
version), then prints one JSON line
{"pid": ..., "token": ..., "url": ...} and exits 0, leaving hass running.
On a failure it kills hass, prints the tail of DIR/hass.log to stderr and
exits 1. The broker must already listen on MQTT_PORT.

get writes the body of GET URL+PATH to stdout as bytes (PATH may carry a
query, e.g. an image entity's entity_picture); a non-2xx status exits 1.

devices prints {"devices": [...], "entities": [...]}: the device and
entity registries, from the websocket API.

stop sends SIGTERM to hass's process group, waits up to 20 s (--timeout),
then SIGKILL.
"""
import argparse
import base64
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

CREDENTIALS = ".ha-harness-credentials.json"
LOG = "hass.log"

CONFIGURATION = """\
# Written by tests/tools/ha_harness.py; rewritten on every start.
homeassistant:
  name: ha-harness
  latitude: 0
  longitude: 0
  elevation: 0
  unit_system: metric
  time_zone: UTC
  currency: EUR
  country: DE
http:
  server_host: 127.0.0.1
  server_port: {port}
api:
config:
logger:
  default: info
"""


class Failure(Exception):
    pass


# --- HTTP ---------------------------------------------------------------

# No proxy from the environment: Home Assistant is on 127.0.0.1.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(method, url, token=None, body=None, form=None, timeout=10):
    """Returns (status, body bytes); raises OSError when nothing answers."""
    headers = {}
    data = None
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    elif form is not None:
        data = urllib.parse.urlencode(form).encode()
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with OPENER.open(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def http_json(method, url, token=None, body=None, form=None, ok=(200, 201)):
    status, data = http(method, url, token, body, form)
    if status not in ok:
        raise Failure(f"{method} {url}: HTTP {status}: {data[:500]!r}")
    return json.loads(data) if data else None


# --- A minimal websocket client (RFC 6455, text frames) ------------------


class WebSocket:
    GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    def __init__(self, base_url, path, timeout=10):
        parts = urllib.parse.urlsplit(base_url)
        host, port = parts.hostname, parts.port or 80
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""
        key = base64.b64encode(os.urandom(16))
        self.sock.sendall(
            b"GET " + path.encode() + b" HTTP/1.1\r\n"
            b"Host: " + f"{host}:{port}".encode() + b"\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: " + key + b"\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        while b"\r\n\r\n" not in self.buf:
            self._more()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        if " 101 " not in lines[0] + " ":
            raise Failure(f"websocket upgrade refused: {lines[0]}")
        accept = base64.b64encode(hashlib.sha1(key + self.GUID).digest()).decode()
        fields = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
        if fields.get("sec-websocket-accept") != accept:
            raise Failure("websocket upgrade: bad Sec-WebSocket-Accept")
        self.pending = []
        self.next_id = 1

    def _more(self):
        chunk = self.sock.recv(65536)
        if not chunk:
            raise Failure("websocket closed by Home Assistant")
        self.buf += chunk

    def _send_frame(self, opcode, payload):
        n = len(payload)
        if n < 126:
            header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 65536:
            header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def _frame(self):
        """One whole frame, (fin, opcode, payload); nothing is consumed from
        the buffer until the frame is complete, so a timeout loses nothing."""
        while True:
            if len(self.buf) >= 2:
                b0, b1 = self.buf[0], self.buf[1]
                n, at = b1 & 0x7F, 2
                if n == 126 and len(self.buf) >= 4:
                    (n,), at = struct.unpack("!H", self.buf[2:4]), 4
                elif n == 127 and len(self.buf) >= 10:
                    (n,), at = struct.unpack("!Q", self.buf[2:10]), 10
                if (b1 & 0x7F) < 126 or at > 2:
                    if b1 & 0x80:
                        raise Failure("websocket: masked frame from server")
                    if len(self.buf) >= at + n:
                        payload = self.buf[at : at + n]
                        self.buf = self.buf[at + n :]
                        return bool(b0 & 0x80), b0 & 0x0F, payload
            self._more()

    def send(self, message):
        self._send_frame(0x1, json.dumps(message).encode())

    def recv(self, timeout=None):
        """The next JSON message; None when timeout (seconds) passes first."""
        if self.pending:
            return self.pending.pop(0)
        self.sock.settimeout(timeout)
        data = b""
        try:
            while True:
                fin, opcode, payload = self._frame()
                if opcode == 0x9:
                    self._send_frame(0xA, payload)
                elif opcode == 0x8:
                    raise Failure("websocket closed by Home Assistant")
                elif opcode in (0x0, 0x1, 0x2):
                    data += payload
                    if fin:
                        break
        except socket.timeout:
            return None
        message = json.loads(data)
        if isinstance(message, list):  # coalesced messages
            self.pending.extend(message[1:])
            message = message[0]
        return message

    def auth(self, token):
        hello = self.recv(10)
        if not hello or hello.get("type") != "auth_required":
            raise Failure(f"websocket: expected auth_required, got {hello}")
        self.send({"type": "auth", "access_token": token})
        reply = self.recv(10)
        if not reply or reply.get("type") != "auth_ok":
            raise Failure(f"websocket: authentication failed: {reply}")
        return self

    def call(self, type_, timeout=30, **fields):
        """Sends a command and returns its result; other messages (events of
        earlier subscriptions) are kept for recv."""
        id_ = self.next_id
        self.next_id += 1
        self.send({"id": id_, "type": type_, **fields})
        deadline = time.monotonic() + timeout
        kept = []
        try:
            while True:
                left = deadline - time.monotonic()
                message = self.recv(max(left, 0.01)) if left > 0 else None
                if message is None:
                    raise Failure(f"websocket: no answer to {type_} in {timeout} s")
                if message.get("id") == id_ and message.get("type") == "result":
                    if not message.get("success"):
                        raise Failure(f"websocket: {type_} failed: {message.get('error')}")
                    return message.get("result")
                kept.append(message)
        finally:
            self.pending[:0] = kept

    def close(self):
        try:
            self._send_frame(0x8, struct.pack("!H", 1000))
        except OSError:
            pass
        self.sock.close()


def websocket(url, token, timeout=10):
    return WebSocket(url, "/api/websocket", timeout).auth(token)


# --- start --------------------------------------------------------------


def port_is_free(port):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def something_listens(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return True
    except OSError:
        return False


def find_hass(explicit):
    if explicit:
        return explicit
    beside = os.path.join(os.path.dirname(sys.executable), "hass")
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which("hass")
    if not found:
        raise Failure("no hass beside this python nor on PATH (scripts/ha-venv.sh; or --hass)")
    return found


class Deadline:
    def __init__(self, seconds):
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self):
        return self.end - time.monotonic()

    def check(self, what):
        if self.left() <= 0:
            raise Failure(f"timed out after {self.seconds} s waiting for {what}")


def wait_for_http(url, proc, deadline):
    """Waits until the onboarding API answers (the HTTP server starts as
    soon as frontend is set up, before Home Assistant is fully running) and
    returns its steps."""
    while True:
        if proc.poll() is not None:
            raise Failure(f"hass exited with status {proc.returncode} while starting")
        deadline.check("the HTTP API")
        try:
            status, data = http("GET", url + "/api/onboarding", timeout=2)
            if status == 200:
                return json.loads(data)
        except (OSError, ValueError):
            pass
        time.sleep(0.25)


def login(url, config_dir, onboarding):
    """Returns a long-lived access token of the owner user."""
    client_id = url + "/"
    credentials_path = os.path.join(config_dir, CREDENTIALS)
    user_done = any(step.get("step") == "user" and step.get("done") for step in onboarding)
    if not user_done:
        credentials = {"username": "harness", "password": secrets.token_urlsafe(18)}
        reply = http_json(
            "POST",
            url + "/api/onboarding/users",
            body={
                "client_id": client_id,
                "name": "Harness",
                "language": "en",
                **credentials,
            },
        )
        code = reply["auth_code"]
        fd = os.open(credentials_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(credentials, f)
    else:
        try:
            with open(credentials_path) as f:
                credentials = json.load(f)
        except OSError:
            raise Failure(
                f"{config_dir} is already onboarded, but not by this harness "
                f"(no {CREDENTIALS}); start from an empty directory"
            )
        flow = http_json(
            "POST",
            url + "/auth/login_flow",
            body={"client_id": client_id, "handler": ["homeassistant", None], "redirect_uri": client_id},
        )
        reply = http_json(
            "POST",
            url + f"/auth/login_flow/{flow['flow_id']}",
            body={"client_id": client_id, **credentials},
        )
        if reply.get("type") != "create_entry":
            raise Failure(f"login with the kept credentials failed: {reply}")
        code = reply["result"]
    tokens = http_json(
        "POST",
        url + "/auth/token",
        form={"grant_type": "authorization_code", "code": code, "client_id": client_id},
    )
    ws = websocket(url, tokens["access_token"])
    try:
        return ws.call(
            "auth/long_lived_access_token",
            client_name=f"ha_harness {time.strftime('%Y-%m-%dT%H:%M:%S')} {secrets.token_hex(3)}",
            lifespan=3650,
        )
    finally:
        ws.close()


def mqtt_entries(url, token):
    return http_json("GET", url + "/api/config/config_entries/entry?domain=mqtt", token)


def configure_mqtt(url, token, mqtt_port, deadline):
    """Replaces any MQTT config entry with one for 127.0.0.1:mqtt_port and
    waits until it is loaded."""
    for entry in mqtt_entries(url, token):
        http_json("DELETE", url + f"/api/config/config_entries/entry/{entry['entry_id']}", token)
    step = http_json(
        "POST",
        url + "/api/config/config_entries/flow",
        token,
        body={"handler": "mqtt", "show_advanced_options": False},
    )
    answers = {"broker": "127.0.0.1", "port": mqtt_port}
    entry_id = None
    for _ in range(5):
        kind = step.get("type")
        if kind == "create_entry":
            entry_id = step["result"]["entry_id"]
            break
        if kind != "form":
            raise Failure(f"MQTT config flow ended with {step}")
        if step.get("errors"):
            raise Failure(f"MQTT config flow step {step.get('step_id')}: {step['errors']}")
        names = {field["name"] for field in step.get("data_schema", [])}
        data = {k: v for k, v in answers.items() if k in names}
        step = http_json(
            "POST", url + f"/api/config/config_entries/flow/{step['flow_id']}", token, body=data
        )
    if entry_id is None:
        raise Failure(f"MQTT config flow did not finish: {step}")
    while True:
        state = next((e["state"] for e in mqtt_entries(url, token) if e["entry_id"] == entry_id), None)
        if state == "loaded":
            return
        if state in ("setup_error", "migration_error", "failed_unload", None):
            raise Failure(f"MQTT config entry state: {state}")
        deadline.check("the MQTT config entry to load")
        time.sleep(0.25)


BIRTH_TOPIC = "homeassistant/status"


def wait_for_mqtt_ready(url, token, deadline):
    """Waits until Home Assistant runs, a message published through its
    mqtt.publish service comes back to its own subscription (so it is
    connected and its subscriptions work), and its birth message
    (homeassistant/status "online", not retained) has gone out. Home
    Assistant sends that only once it runs and 2 s have passed with no
    discovery message and no pending subscription, so it comes after the
    discovery subscriptions are in place, and cannot slip past this
    subscription, made as soon as the entry is loaded."""
    probe = f"ha_harness/probe/{secrets.token_hex(4)}"
    seen = set()
    ws = websocket(url, token)

    def take(timeout):
        message = ws.recv(max(timeout, 0.01))
        if message and message.get("type") == "event":
            event = message.get("event", {})
            if event.get("topic") == BIRTH_TOPIC and event.get("payload") == "online":
                seen.add("birth")
            elif event.get("topic") == probe:
                seen.add("probe")

    try:
        ws.call("mqtt/subscribe", topic=BIRTH_TOPIC)
        ws.call("mqtt/subscribe", topic=probe)
        while ws.call("get_config").get("state") != "RUNNING":
            deadline.check("Home Assistant to finish starting")
            take(0.25)
        while "probe" not in seen:
            deadline.check("a message round trip through the MQTT broker")
            http_json("POST", url + "/api/services/mqtt/publish", token, body={"topic": probe, "payload": "probe"})
            until = time.monotonic() + 1.0
            while "probe" not in seen and (left := until - time.monotonic()) > 0:
                take(left)
        while "birth" not in seen:
            deadline.check(f"Home Assistant's birth message ({BIRTH_TOPIC} online)")
            take(min(1.0, deadline.left()))
    finally:
        ws.close()


def kill_group(pid, timeout=20.0):
    """SIGTERM to the process group led by pid, then SIGKILL after timeout.
    Returns True once pid is gone."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    if wait_gone(pid, timeout):
        return True
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return True
    return wait_gone(pid, 5.0)


def alive(pid):
    """True while pid runs (a zombie, exited but not yet reaped, is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_gone(pid, timeout):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:  # reap it if it is our own child
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        if not alive(pid):
            return True
        time.sleep(0.1)
    return not alive(pid)


def log_tail(path, lines=60):
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 200_000))
            text = f.read().decode("utf-8", "replace")
    except OSError as e:
        return f"(no {path}: {e})"
    return "\n".join(text.splitlines()[-lines:])


def cmd_start(args):
    deadline = Deadline(args.timeout)
    config_dir = os.path.abspath(args.config)
    os.makedirs(config_dir, exist_ok=True)
    log_path = os.path.join(config_dir, LOG)
    url = f"http://127.0.0.1:{args.port}"
    proc = None
    try:
        if not port_is_free(args.port):
            raise Failure(f"HTTP port {args.port} on 127.0.0.1 is taken")
        if not something_listens(args.mqtt_port):
            raise Failure(f"no MQTT broker listens on 127.0.0.1:{args.mqtt_port}")
        hass = find_hass(args.hass)
        with open(os.path.join(config_dir, "configuration.yaml"), "w") as f:
            f.write(CONFIGURATION.format(port=args.port))
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [hass, "-c", config_dir, "--skip-pip", "--log-no-color"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        onboarding = wait_for_http(url, proc, deadline)
        token = login(url, config_dir, onboarding)
        configure_mqtt(url, token, args.mqtt_port, deadline)
        wait_for_mqtt_ready(url, token, deadline)
    except (Failure, OSError, ValueError, KeyError) as e:
        print(f"ha_harness start: {e}", file=sys.stderr)
        if proc is not None:
            kill_group(proc.pid, 10.0)
            print(f"--- last lines of {log_path}:", file=sys.stderr)
            print(log_tail(log_path), file=sys.stderr)
        return 1
    print(json.dumps({"pid": proc.pid, "token": token, "url": url}), flush=True)
    return 0


# --- get, devices, stop --------------------------------------------------


def cmd_get(args):
    target = args.path if "://" in args.path else args.url.rstrip("/") + args.path
    try:
        status, data = http("GET", target, args.token, timeout=30)
    except OSError as e:
        print(f"ha_harness get {args.path}: {e}", file=sys.stderr)
        return 1
    if not 200 <= status < 300:
        print(f"ha_harness get {args.path}: HTTP {status}: {data[:500]!r}", file=sys.stderr)
        return 1
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
    return 0


def cmd_devices(args):
    try:
        ws = websocket(args.url.rstrip("/"), args.token)
        try:
            devices = ws.call("config/device_registry/list")
            entities = ws.call("config/entity_registry/list")
        finally:
            ws.close()
    except (Failure, OSError, ValueError) as e:
        print(f"ha_harness devices: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"devices": devices, "entities": entities}))
    return 0


def cmd_stop(args):
    pid = args.pid
    if not alive(pid):
        return 0
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return 0
    if "hass" not in cmdline and "homeassistant" not in cmdline:
        print(f"ha_harness stop: pid {pid} is not hass: {cmdline.strip()}", file=sys.stderr)
        return 1
    if os.getpgid(pid) != pid:
        print(f"ha_harness stop: pid {pid} leads no process group of its own", file=sys.stderr)
        return 1
    if kill_group(pid, args.timeout):
        return 0
    print(f"ha_harness stop: pid {pid} still runs after SIGKILL", file=sys.stderr)
    return 1


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("start")
    p.add_argument("--config", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mqtt-port", type=int, required=True)
    p.add_argument("--hass")
    p.add_argument("--timeout", type=float, default=120.0)
    p.set_defaults(func=cmd_start)
    p = sub.add_parser("get")
    p.add_argument("--url", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("path")
    p.set_defaults(func=cmd_get)
    p = sub.add_parser("devices")
    p.add_argument("--url", required=True)
    p.add_argument("--token", required=True)
    p.set_defaults(func=cmd_devices)
    p = sub.add_parser("stop")
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--timeout", type=float, default=20.0)
    p.set_defaults(func=cmd_stop)
    args = parser.parse_args()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
