"""Shared helpers for the interop suite: off-the-shelf MQTT clients against a real `tidegate serve` process.

Test modules reach everything through fixtures (pytest runs with --import-mode=importlib, so this file is not
importable by name):

* `require_tool(name)` is the one place that decides what happens when an outside tool (mosquitto_sub,
  mosquitto_pub, openssl) is missing: the test FAILS when CI=true, otherwise it is skipped with the reason.
  Fixture `mosquitto` (both mosquitto clients) and `tool` (any executable) go through it.
* `broker`: one `tidegate serve` process per test module with the MQTT listeners on ephemeral 127.0.0.1 ports;
  a module may set `BROKER_ARGS = ("--set", "key=value", ...)`. `broker_factory` starts extra brokers (restart tests)
  in the test's tmp dir and stops them afterwards.
* `mosquitto.sub(...)`: a running mosquitto_sub whose output is parsed on a reader thread; tests wait on "SUBACK
  received" and "n messages received" with bounded timeouts, never on sleeps. `mosquitto.pub(...)`: one bounded run.
* `paho_client(...)`: paho-mqtt 2.x clients on their own network thread with events for connect/subscribe/message.
* `raw_mqtt(port)`: a plain socket speaking hand-made MQTT packets, for malformed input and abrupt drops.
* AMQP: `amqp_broker` (one broker per module with the native, MQTT and AMQP listeners), `amqp_broker_factory`
  (restart tests), `amqp_url(process)` (`amqp://guest:guest@127.0.0.1:<port>/%2F`) and `amqp_tools` (amqp-publish
  and amqp-consume from Debian's amqp-tools, under the same CI rule as mosquitto).
* `mqtt_loadgen`: the C MQTT load generator (interop/loadgen/mqtt_loadgen.c) built into a temp dir (no compiler:
  fail when CI=true, else skip).
"""

from __future__ import annotations

import os
import pty
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tidegate.gateway.testing import BrokerProcess, wait_until

TIMEOUT = 15.0  # upper bound of every wait in the suite
TOOL_TIMEOUT = 20.0  # upper bound of one mosquitto_pub run
MQTT_LISTENERS = ("native", "admin", "mqtt", "mqtt_ws")


# ---------------------------------------------------------------------------------------------------- outside tools

def require_tool(name: str) -> str:
    """Path of the executable `name`; missing: fail under CI=true (the suite must not silently shrink), else skip."""
    path = shutil.which(name)
    if path:
        return path
    package = {"mosquitto_sub": "mosquitto-clients", "mosquitto_pub": "mosquitto-clients",
               "amqp-publish": "amqp-tools", "amqp-consume": "amqp-tools"}.get(name, name)
    reason = f"{name} is not installed (apt-get install {package})"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}; CI=true requires it", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def mosquitto_tools() -> None:
    """Both mosquitto command-line clients, or fail (CI) / skip (elsewhere)."""
    require_tool("mosquitto_sub")
    require_tool("mosquitto_pub")


# ---------------------------------------------------------------------------------------------------- the broker

def start_broker(data_dir: Path, *extra_args: str, listeners: Sequence[str] = MQTT_LISTENERS) -> BrokerProcess:
    """A started broker process with the MQTT listeners on ephemeral 127.0.0.1 ports."""
    return BrokerProcess(data_dir, *extra_args, listeners=listeners).start()


def stop_quietly(process: BrokerProcess) -> None:
    if process.process is not None and process.process.poll() is None:
        try:
            process.stop()
        except subprocess.TimeoutExpired:
            process.kill()


def mqtt_port(process: BrokerProcess, name: str = "mqtt") -> int:
    return process.host_port(name)[1]


# ---------------------------------------------------------------------------------------------------- mosquitto

FIELD_SEP = "\t"
# One line per received message: marker, topic, qos, retain, hex payload, content type, expiry, user properties.
SUB_FORMAT = "M\\t%t\\t%q\\t%r\\t%x\\t%C\\t%E\\t%P"


@dataclass
class Received:
    topic: str
    qos: int
    retain: bool
    payload: bytes
    content_type: str = ""
    expiry: str = ""
    user_properties: list[tuple[str, str]] = field(default_factory=list)


def _parse_line(line: str) -> Received | None:
    if not line.startswith("M" + FIELD_SEP):
        return None
    parts = line.rstrip("\n").split(FIELD_SEP)
    if len(parts) < 8:
        return None
    _, topic, qos, retain, hexpayload, content_type, expiry, props = parts[:8]
    user_properties = [tuple(p.split(":", 1)) for p in props.split(" ") if ":" in p]
    return Received(topic, int(qos), retain == "1", bytes.fromhex(hexpayload), content_type, expiry,
                    user_properties)  # type: ignore[arg-type]


class MosquittoSub:
    """`mosquitto_sub -d` in the background; `-d` prints "received SUBACK", which is when the subscription exists."""

    def __init__(self, port: int, *topics: str, qos: int = 0, version: str = "mqttv311",
                 extra: Sequence[str] = (), host: str = "127.0.0.1") -> None:
        tool = require_tool("mosquitto_sub")
        args = [tool, "-h", host, "-p", str(port), "-V", version, "-d", "-q", str(qos), "-F", SUB_FORMAT,
                *extra]
        for topic in topics:
            args += ["-t", topic]
        self.args = args
        self.lines: list[str] = []
        self.messages: list[Received] = []
        self._lock = threading.Lock()
        # A pseudo-terminal makes mosquitto_sub's stdio line-buffered: with a pipe, the SUBACK line and the
        # messages would sit in its buffer until it exits.
        master, slave = pty.openpty()
        self._master = master
        try:
            self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
                                            close_fds=True)
        finally:
            os.close(slave)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        pending = b""
        while True:
            try:
                chunk = os.read(self._master, 65536)
            except OSError:  # EIO: the child closed the terminal
                chunk = b""
            if not chunk:
                break
            pending += chunk
            *complete, pending = pending.split(b"\n")
            for raw in complete:
                self._add(raw.rstrip(b"\r").decode(errors="replace"))
        if pending:
            self._add(pending.rstrip(b"\r").decode(errors="replace"))
        os.close(self._master)

    def _add(self, line: str) -> None:
        with self._lock:
            self.lines.append(line + "\n")
            message = _parse_line(line)
            if message is not None:
                self.messages.append(message)

    def output(self) -> str:
        with self._lock:
            return "".join(self.lines)

    def _has(self, text: str) -> bool:
        with self._lock:
            return any(text in line for line in self.lines)

    def wait_subscribed(self, timeout: float = TIMEOUT) -> MosquittoSub:
        deadline = time.monotonic() + timeout
        while not self._has("received SUBACK"):
            if self.process.poll() is not None:
                self._reader.join(timeout=5)
                if self._has("received SUBACK"):
                    break
                raise AssertionError(f"mosquitto_sub exited ({self.process.returncode}) before SUBACK:\n"
                                     f"{self.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"mosquitto_sub got no SUBACK within {timeout}s:\n{self.output()}")
            time.sleep(0.01)  # polling interval of a bounded wait
        return self

    def received(self, predicate: Callable[[Received], bool] = lambda m: True) -> list[Received]:
        with self._lock:
            return [m for m in self.messages if predicate(m)]

    def wait_messages(self, count: int, predicate: Callable[[Received], bool] = lambda m: True,
                      timeout: float = TIMEOUT) -> list[Received]:
        deadline = time.monotonic() + timeout
        while len(self.received(predicate)) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"mosquitto_sub got {len(self.received(predicate))} of {count} expected "
                                     f"messages within {timeout}s:\n{self.output()[-4000:]}")
            if self.process.poll() is not None:
                self._reader.join(timeout=5)
                if len(self.received(predicate)) >= count:
                    break
                raise AssertionError(f"mosquitto_sub exited ({self.process.returncode}):\n{self.output()[-4000:]}")
            time.sleep(0.01)  # polling interval of a bounded wait
        return self.received(predicate)

    def wait_exit(self, timeout: float = TIMEOUT) -> int:
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return code

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._reader.join(timeout=5)

    def __enter__(self) -> MosquittoSub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def mosquitto_pub(port: int, topic: str, message: str | None = None, *, qos: int = 0, version: str = "mqttv311",
                  extra: Sequence[str] = (), check: bool = True, host: str = "127.0.0.1",
                  timeout: float = TOOL_TIMEOUT) -> subprocess.CompletedProcess:
    """One mosquitto_pub run (bounded). `message=None` means `-n` (empty payload) unless `extra` gives a source."""
    tool = require_tool("mosquitto_pub")
    args = [tool, "-h", host, "-p", str(port), "-V", version, "-q", str(qos), "-t", topic, *extra]
    if message is not None:
        args += ["-m", message]
    elif not any(a in ("-f", "-s", "-l", "-n") for a in extra):
        args.append("-n")
    done = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, f"mosquitto_pub failed ({done.returncode}): {done.stdout}{done.stderr}"
    return done


def subscribe_and_confirm(port: int, *topics: str, **kwargs) -> MosquittoSub:
    return MosquittoSub(port, *topics, **kwargs).wait_subscribed()


# ---------------------------------------------------------------------------------------------------- paho

class PahoClient:
    """A paho-mqtt client with its network loop on a thread; every wait is bounded."""

    def __init__(self, client_id: str, version: int = 4, transport: str = "tcp", clean: bool = True,
                 session_expiry: int | None = None) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.paho = paho
        self.version = version
        protocol = paho.MQTTv5 if version == 5 else paho.MQTTv311
        kwargs = {} if version == 5 else {"clean_session": clean}
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol,
                                  transport=transport, reconnect_on_failure=False, **kwargs)
        if transport == "websockets":
            self.client.ws_set_options(path="/mqtt")
        self.clean = clean
        self.session_expiry = session_expiry
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.subscribed = threading.Event()
        self.connect_flags = None
        self.connect_reason = None
        self.disconnect_reason = None
        self.granted: list = []
        self.messages: list = []
        self._lock = threading.Lock()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def _on_connect(self, client, userdata, flags, reason, properties) -> None:
        self.connect_flags, self.connect_reason = flags, reason
        self.connected.set()

    def _on_disconnect(self, client, userdata, flags, reason, properties) -> None:
        self.disconnect_reason = reason
        self.disconnected.set()

    def _on_subscribe(self, client, userdata, mid, reasons, properties) -> None:
        self.granted = list(reasons)
        self.subscribed.set()

    def _on_message(self, client, userdata, message) -> None:
        with self._lock:
            self.messages.append(message)

    def connect(self, port: int, host: str = "127.0.0.1", keepalive: int = 30) -> PahoClient:
        kwargs: dict = {}
        if self.version == 5:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            kwargs["clean_start"] = self.clean
            if self.session_expiry is not None:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = self.session_expiry
                kwargs["properties"] = props
        self.client.connect(host, port, keepalive=keepalive, **kwargs)
        self.client.loop_start()
        assert self.connected.wait(TIMEOUT), "paho: no CONNACK"
        assert not self.connect_reason.is_failure, f"paho: connect refused: {self.connect_reason}"
        return self

    def subscribe(self, topic: str, qos: int = 1) -> list:
        self.subscribed.clear()
        result, _ = self.client.subscribe(topic, qos)
        assert result == self.paho.MQTT_ERR_SUCCESS
        assert self.subscribed.wait(TIMEOUT), f"paho: no SUBACK for {topic}"
        return self.granted

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, properties=None) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        info.wait_for_publish(timeout=TIMEOUT)
        assert info.is_published(), f"paho: publish to {topic} not acknowledged"

    def received(self, predicate: Callable = lambda m: True) -> list:
        with self._lock:
            return [m for m in self.messages if predicate(m)]

    def wait_messages(self, count: int, predicate: Callable = lambda m: True, timeout: float = TIMEOUT) -> list:
        wait_until(lambda: len(self.received(predicate)) >= count, timeout,
                   f"{count} messages on paho client {self.client._client_id!r}")
        return self.received(predicate)

    def disconnect(self) -> None:
        if self.connected.is_set() and not self.disconnected.is_set():
            self.client.disconnect()
            self.disconnected.wait(TIMEOUT)
        self.client.loop_stop()

    def __enter__(self) -> PahoClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.disconnect()


# ---------------------------------------------------------------------------------------------------- raw MQTT

def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def mqtt_str(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("!H", len(data)) + data


def packet(first_byte: int, body: bytes) -> bytes:
    return bytes([first_byte]) + varint(len(body)) + body


def connect_packet(client_id: str, level: int = 4, flags: int = 0x02, keepalive: int = 30,
                   will: tuple[str, bytes] | None = None, will_qos: int = 0, properties: bytes = b"") -> bytes:
    """CONNECT; `flags` is the connect-flags byte (0x02 = clean session); a will sets its flag bits itself."""
    payload = mqtt_str(client_id)
    if will is not None:
        flags |= 0x04 | (will_qos << 3)
        if level == 5:
            payload += b"\x00"  # no will properties
        payload += mqtt_str(will[0]) + mqtt_str(will[1])
    header = mqtt_str("MQTT") + bytes([level, flags]) + struct.pack("!H", keepalive)
    if level == 5:
        header += varint(len(properties)) + properties
    return packet(0x10, header + payload)


def publish_packet(topic: str, payload: bytes, qos: int = 0, packet_id: int = 1, level: int = 4,
                   flags: int | None = None) -> bytes:
    body = mqtt_str(topic)
    if qos:
        body += struct.pack("!H", packet_id)
    if level == 5:
        body += b"\x00"
    return packet(0x30 | (flags if flags is not None else qos << 1), body + payload)


DISCONNECT = b"\xe0\x00"


class RawMqtt:
    """A plain TCP connection for hand-made packets; reads are bounded by TIMEOUT."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection((host, port), timeout=TIMEOUT)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_packet(self) -> tuple[int, bytes] | None:
        """(first byte, body) of the next packet, or None when the broker closed the connection."""
        while True:
            if len(self.buffer) >= 2:
                length, shift, index = 0, 0, 1
                while index < len(self.buffer):
                    byte = self.buffer[index]
                    length |= (byte & 0x7F) << shift
                    shift += 7
                    index += 1
                    if not byte & 0x80:
                        if len(self.buffer) >= index + length:
                            first, body = self.buffer[0], self.buffer[index:index + length]
                            self.buffer = self.buffer[index + length:]
                            return first, body
                        break
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return None
            self.buffer += chunk

    def read_until_closed(self) -> list[tuple[int, bytes]]:
        """Every packet the broker sends until it closes the connection (fails if it does not within TIMEOUT)."""
        packets = []
        while True:
            try:
                got = self.read_packet()
            except TimeoutError:
                raise AssertionError(f"the broker did not close the connection within {TIMEOUT}s "
                                     f"(received {packets})") from None
            if got is None:
                return packets
            packets.append(got)

    def connect(self, client_id: str, level: int = 4, **kwargs) -> tuple[int, bytes]:
        self.send(connect_packet(client_id, level, **kwargs))
        connack = self.read_packet()
        assert connack is not None and connack[0] == 0x20, f"expected CONNACK, got {connack}"
        return connack

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawMqtt:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------- fixtures

class Mosquitto:
    """mosquitto_sub / mosquitto_pub for one test; subscribers are terminated at teardown."""

    def __init__(self) -> None:
        self.subs: list[MosquittoSub] = []

    def sub(self, port: int, *topics: str, wait: bool = True, **kwargs) -> MosquittoSub:
        """Start mosquitto_sub; with `wait` (default) return once its SUBACK arrived."""
        subscriber = MosquittoSub(port, *topics, **kwargs)
        self.subs.append(subscriber)
        return subscriber.wait_subscribed() if wait else subscriber

    def pub(self, port: int, topic: str, message: str | None = None, **kwargs) -> subprocess.CompletedProcess:
        return mosquitto_pub(port, topic, message, **kwargs)

    def close(self) -> None:
        for subscriber in self.subs:
            subscriber.close()


@pytest.fixture
def mosquitto():
    """Both mosquitto command-line clients (missing: fail when CI=true, skip otherwise)."""
    require_tool("mosquitto_sub")
    require_tool("mosquitto_pub")
    helper = Mosquitto()
    yield helper
    helper.close()


@pytest.fixture(scope="session")
def tool():
    """`tool(name)`: the path of an outside executable, under the same CI rule as mosquitto."""
    return require_tool


@pytest.fixture(scope="module")
def broker(request, tmp_path_factory):
    """One broker per test module; extra arguments from the module's BROKER_ARGS."""
    args = tuple(getattr(request.module, "BROKER_ARGS", ()))
    process = start_broker(tmp_path_factory.mktemp("broker") / "data", *args)
    yield process
    stop_quietly(process)


@pytest.fixture
def broker_factory(tmp_path):
    """`broker_factory(name, *args)`: a started broker of this test (restart tests); all stopped at teardown."""
    started: list[BrokerProcess] = []

    def make(name: str = "data", *args: str) -> BrokerProcess:
        process = start_broker(tmp_path / name, *args)
        started.append(process)
        return process

    yield make
    for process in started:
        stop_quietly(process)


@pytest.fixture
def paho_client():
    """`paho_client(client_id, version=4|5, transport=..., clean=..., session_expiry=...)`; disconnected at teardown."""
    clients: list[PahoClient] = []

    def make(client_id: str, **kwargs) -> PahoClient:
        client = PahoClient(client_id, **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        try:
            client.disconnect()
        except Exception:  # noqa: BLE001 - teardown of a client the test may have broken on purpose
            client.client.loop_stop()


@pytest.fixture
def raw_mqtt():
    """`raw_mqtt(port)`: a RawMqtt connection, closed at teardown."""
    sockets: list[RawMqtt] = []

    def make(port: int) -> RawMqtt:
        connection = RawMqtt(port)
        sockets.append(connection)
        return connection

    yield make
    for connection in sockets:
        connection.close()


# packet builders reachable from a connection: raw.send(raw.connect_packet("c1", level=5))
RawMqtt.connect_packet = staticmethod(connect_packet)  # type: ignore[attr-defined]
RawMqtt.publish_packet = staticmethod(publish_packet)  # type: ignore[attr-defined]
RawMqtt.packet = staticmethod(packet)  # type: ignore[attr-defined]
RawMqtt.varint = staticmethod(varint)  # type: ignore[attr-defined]
RawMqtt.mqtt_str = staticmethod(mqtt_str)  # type: ignore[attr-defined]
RawMqtt.DISCONNECT = DISCONNECT  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------------- AMQP

AMQP_LISTENERS = ("native", "admin", "mqtt", "amqp")


def amqp_port(process: BrokerProcess) -> int:
    return process.host_port("amqp")[1]


@pytest.fixture(scope="session")
def amqp_url():
    """`amqp_url(process)`: the URL pika, kombu and aio-pika take for the default virtual host as user guest."""
    return lambda process: f"amqp://guest:guest@127.0.0.1:{amqp_port(process)}/%2F"


@pytest.fixture(scope="module")
def amqp_broker(request, tmp_path_factory):
    """One broker per test module with the native, MQTT and AMQP listeners; extra arguments from BROKER_ARGS."""
    args = tuple(getattr(request.module, "BROKER_ARGS", ()))
    process = start_broker(tmp_path_factory.mktemp("amqp-broker") / "data", *args, listeners=AMQP_LISTENERS)
    yield process
    stop_quietly(process)


@pytest.fixture
def amqp_broker_factory(tmp_path):
    """`amqp_broker_factory(name, *args)`: a started broker with the AMQP listener (restart tests)."""
    started: list[BrokerProcess] = []

    def make(name: str = "data", *args: str) -> BrokerProcess:
        process = start_broker(tmp_path / name, *args, listeners=AMQP_LISTENERS)
        started.append(process)
        return process

    yield make
    for process in started:
        stop_quietly(process)


@pytest.fixture
def amqp_tools() -> None:
    """amqp-publish and amqp-consume (missing: fail when CI=true, skip otherwise)."""
    require_tool("amqp-publish")
    require_tool("amqp-consume")


# ---------------------------------------------------------------------------------------------------- C load generator

@pytest.fixture(scope="session")
def mqtt_loadgen(tmp_path_factory) -> Path:
    """The C MQTT load generator (interop/loadgen/mqtt_loadgen.c) compiled into a temp dir. No C compiler: fail when
    CI=true, else skip (like the outside tools); a compile error always fails."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tidegate_loadgen_build",
                                                  Path(__file__).with_name("loadgen") / "build.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)  # type: ignore[union-attr]
    if builder.compiler() is None:
        reason = "no C compiler for the MQTT load generator (apt-get install gcc libc6-dev)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason}; CI=true requires it", pytrace=False)
        pytest.skip(reason)
    try:
        return builder.build_loadgen(tmp_path_factory.mktemp("loadgen"))
    except builder.LoadgenUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
