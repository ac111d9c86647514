"""End to end against a real `tidegate serve` with TLS only (plain ports switched off), `tls.ca_file` set (which
used to stop the broker from starting) and `verify = "optional"`:

- paho over mTLS without a user name logs in as its certificate's CN (Mosquitto's use_identity_as_username) and is
  held to that user's policies; a certificate naming no user, an untrusted or an expired one is refused;
- the SDK over TLS: verified against the CA, the hostname checked with service-identity (a wrong one fails),
  passwords over TLS, and a client certificate as the login;
- the admin API over HTTPS; certificates reloaded by SIGHUP and by `tidegate admin tls-reload` without dropping
  a connected client; the handshake-failure counter and the not-after gauge on /metrics.
"""

from __future__ import annotations

import base64
import json
import shutil
import signal
import socket
import ssl
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from cryptography import x509
from paho.mqtt.enums import CallbackAPIVersion

from tidegate.client import Admin, ClientTls, Producer, TlsError
from tidegate.core.errors import NotAuthenticated, NotAuthorized
from tidegate.gateway import cli
from tidegate.gateway.testing import BrokerProcess, wait_until

from .certs import ClientIdentity, Pki, make_pki

TIMEOUT = 10.0
ADMIN_PASSWORD = "adminpw-tls"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def served_files(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> tuple[Path, Path]:
    """The certificate and key paths the broker is configured with (overwritten by the reload test)."""
    directory = tmp_path_factory.mktemp("served")
    cert_file, key_file = directory / "server.pem", directory / "server.key"
    shutil.copy(pki.server_chain, cert_file)
    shutil.copy(pki.server_key, key_file)
    return cert_file, key_file


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory, pki: Pki, served_files) -> Iterator[BrokerProcess]:
    cert_file, key_file = served_files
    settings = {
        "security.login_delay_ms": "0", "security.allow_anonymous": "false",
        "tls.cert_file": cert_file, "tls.key_file": key_file, "tls.ca_file": pki.client_ca_bundle,
        "tls.verify": "optional",
    }
    for section in ("native", "mqtt", "admin"):
        settings |= {f"listeners.{section}.tls_enabled": "true", f"listeners.{section}.tls_port": "0",
                     f"listeners.{section}.plain_enabled": "false"}
    args = [item for key, value in settings.items() for item in ("--set", f"{key}={value}")]
    process = BrokerProcess(tmp_path_factory.mktemp("tls-broker") / "data", "--log-level", "warning", *args,
                            listeners=("native", "admin", "mqtt"), env={"TIDEGATE_ADMIN_PASSWORD": ADMIN_PASSWORD})
    process.start()
    try:
        yield process
    finally:
        assert process.stop() == 0, process.log()


def admin_call(broker: BrokerProcess, pki: Pki, method: str, path: str, body: object = None) -> object:
    token = base64.b64encode(f"admin:{ADMIN_PASSWORD}".encode()).decode()
    request = urllib.request.Request(f"https://{broker.address('admin_tls')}{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"})
    context = ssl.create_default_context(cafile=str(pki.root_ca))
    with urllib.request.urlopen(request, timeout=TIMEOUT, context=context) as response:
        raw = response.read()
    return json.loads(raw) if raw.startswith((b"{", b"[")) else raw.decode()


@pytest.fixture(scope="module")
def users(broker: BrokerProcess, pki: Pki) -> None:
    """alice exists without a password (certificate only); bob has no user; topics made by the admin."""
    admin_call(broker, pki, "POST", "/api/security/users", {"name": "alice"})
    for resource, actions in (("Topic:certs/${username}/#", ["Pub", "Sub"]), ("Topic:certs-native", ["Pub"])):
        admin_call(broker, pki, "POST", "/api/security/policies",
                   {"owner": "user:alice", "resource": resource, "actions": actions, "decision": "Allow"})
    with Admin(broker.address("native_tls"), tls=ClientTls(ca_file=str(pki.root_ca)), username="admin",
               password=ADMIN_PASSWORD) as admin:
        for topic in ("certs", "certs-native", "other"):
            admin.create_topic(topic)


# ------------------------------------------------------------------------------------------------ listeners
def test_only_tls_listeners_are_bound_when_plain_ones_are_switched_off(broker: BrokerProcess) -> None:
    """plain_enabled = false on native, MQTT and admin: listeners.json names only the TLS endpoints; the broker
    started with tls.ca_file set (it used to refuse to start)."""
    assert set(broker.addresses) == {"native_tls", "mqtt_tls", "admin_tls"}


def test_admin_api_answers_over_https(broker: BrokerProcess, pki: Pki) -> None:
    assert admin_call(broker, pki, "GET", "/healthz") is not None
    assert any(u["name"] == "admin" for u in admin_call(broker, pki, "GET", "/api/security/users"))


# ------------------------------------------------------------------------------------------------ MQTT
class PahoClient:
    def __init__(self, pki: Pki, identity: ClientIdentity | None, client_id: str) -> None:
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311)
        self.client.tls_set(ca_certs=str(pki.root_ca), certfile=str(identity.cert_file) if identity else None,
                            keyfile=str(identity.key_file) if identity else None)
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.connect_reason: object = None
        self.granted: list = []
        self.messages: list[paho.MQTTMessage] = []
        self.got_message = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def _on_connect(self, client, userdata, flags, reason, properties) -> None:
        self.connect_reason = reason
        self.connected.set()

    def _on_subscribe(self, client, userdata, mid, reasons, properties) -> None:
        self.granted = list(reasons)
        self.subscribed.set()

    def _on_message(self, client, userdata, message) -> None:
        self.messages.append(message)
        self.got_message.set()

    def connect(self, port: int) -> object:
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        assert self.connected.wait(TIMEOUT), "no CONNACK"
        return self.connect_reason

    def subscribe(self, topic: str) -> list:
        self.subscribed.clear()
        self.client.subscribe(topic, qos=1)
        assert self.subscribed.wait(TIMEOUT), "no SUBACK"
        return self.granted

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def paho_client(pki: Pki) -> Iterator:
    made: list[PahoClient] = []

    def make(identity: ClientIdentity | None, client_id: str) -> PahoClient:
        made.append(PahoClient(pki, identity, client_id))
        return made[-1]

    yield make
    for client in made:
        client.stop()


def test_paho_with_a_client_certificate_and_no_username_logs_in_as_the_certificate_cn(
        broker: BrokerProcess, users: None, pki: Pki, paho_client) -> None:
    """alice's certificate, no user name: CONNACK accepted as user alice, who may use certs/alice/# only."""
    client = paho_client(pki.alice, "paho-alice")
    assert not client.connect(broker.host_port("mqtt_tls")[1]).is_failure
    granted = client.subscribe("certs/alice/#")
    assert not granted[0].is_failure
    denied = client.subscribe("certs/bob/#")
    assert denied[0].is_failure  # 0x80: alice's policies hold for the certificate login
    client.client.publish("certs/alice/temp", b"21.5", qos=1)
    assert client.got_message.wait(TIMEOUT)
    assert client.messages[0].payload == b"21.5"


def test_paho_certificate_naming_no_user_is_refused(broker: BrokerProcess, users: None, pki: Pki,
                                                     paho_client) -> None:
    """bob's certificate verifies, but there is no user bob: CONNACK refuses (not authorized)."""
    reason = paho_client(pki.bob, "paho-bob").connect(broker.host_port("mqtt_tls")[1])
    assert reason.is_failure


def test_paho_without_certificate_or_username_is_anonymous_and_refused(broker: BrokerProcess, users: None,
                                                                       pki: Pki, paho_client) -> None:
    """verify=optional lets the TLS handshake through without a certificate; the login is then anonymous,
    which allow_anonymous=false refuses."""
    reason = paho_client(None, "paho-nobody").connect(broker.host_port("mqtt_tls")[1])
    assert reason.is_failure


@pytest.mark.parametrize("who", ["mallory", "expired"])
def test_paho_with_an_untrusted_or_expired_certificate_fails_the_handshake(broker: BrokerProcess, pki: Pki,
                                                                           who: str) -> None:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"paho-{who}", protocol=paho.MQTTv311)
    identity = getattr(pki, who)
    client.tls_set(ca_certs=str(pki.root_ca), certfile=str(identity.cert_file), keyfile=str(identity.key_file))
    client.connect("127.0.0.1", broker.host_port("mqtt_tls")[1], keepalive=30)
    # TLS 1.3: the client's handshake finishes first; the broker's refusal arrives with the first read.
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        for _ in range(50):
            if client.loop(timeout=0.2) != paho.MQTT_ERR_SUCCESS:
                raise ConnectionError("connection refused")
    client.disconnect()


# ------------------------------------------------------------------------------------------------ SDK
def test_sdk_over_tls_with_password(broker: BrokerProcess, users: None, pki: Pki) -> None:
    with Producer(broker.address("native_tls"), tls=ClientTls(ca_file=str(pki.root_ca)), username="admin",
                  password=ADMIN_PASSWORD) as producer:
        assert producer.send("other", b"over tls").topic == "other"


def test_sdk_with_a_client_certificate_and_no_credentials_logs_in_as_the_certificate(
        broker: BrokerProcess, users: None, pki: Pki) -> None:
    tls = ClientTls(ca_file=str(pki.root_ca), cert_file=str(pki.alice.cert_file), key_file=str(pki.alice.key_file))
    with Producer(broker.address("native_tls"), tls=tls) as producer:
        assert producer.send("certs-native", b"as alice").topic == "certs-native"
        with pytest.raises(NotAuthorized):
            producer.send("other", b"alice may not")


def test_sdk_certificate_naming_no_user_is_refused(broker: BrokerProcess, users: None, pki: Pki) -> None:
    tls = ClientTls(ca_file=str(pki.root_ca), cert_file=str(pki.bob.cert_file), key_file=str(pki.bob.key_file))
    with pytest.raises(NotAuthenticated):
        Producer(broker.address("native_tls"), tls=tls).start()


def test_sdk_checks_the_server_hostname(broker: BrokerProcess, pki: Pki) -> None:
    """The certificate is for localhost/127.0.0.1: a client expecting another name refuses the broker."""
    tls = ClientTls(ca_file=str(pki.root_ca), server_hostname="broker.example.org")
    with pytest.raises(TlsError, match="does not match 'broker.example.org'"):
        Producer(broker.address("native_tls"), tls=tls, username="admin", password=ADMIN_PASSWORD).start()
    host, port = broker.host_port("native_tls")
    tls = ClientTls(ca_file=str(pki.root_ca))  # "localhost" is in the certificate too
    with Producer(f"localhost:{port}", tls=tls, username="admin", password=ADMIN_PASSWORD) as producer:
        assert producer.send("other", b"by name").topic == "other"


def test_sdk_verifies_by_default_against_the_system_store(broker: BrokerProcess) -> None:
    """Without ca_file the system trust store is used, which does not know the test CA: refused."""
    with pytest.raises(TlsError, match="handshake"):
        Producer(broker.address("native_tls"), tls=ClientTls(), username="admin", password=ADMIN_PASSWORD).start()


def test_twisted_sdk_connects_over_tls(broker: BrokerProcess, users: None, pki: Pki) -> None:
    from twisted.internet import reactor
    from twisted.internet.threads import blockingCallFromThread

    from tidegate.client import connect

    if not reactor.running:
        threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False}, daemon=True).start()
    host, port = broker.host_port("native_tls")
    tls = ClientTls(ca_file=str(pki.root_ca), cert_file=str(pki.alice.cert_file), key_file=str(pki.alice.key_file))
    client = blockingCallFromThread(reactor, connect, reactor, host, port, tls=tls)
    try:
        result = blockingCallFromThread(reactor, client.send, "certs-native", b"twisted tls")
        assert result.topic == "certs-native"
    finally:
        blockingCallFromThread(reactor, client.close)


# ------------------------------------------------------------------------------------------------ reload, metrics
def served_serial(address: tuple[str, int], pki: Pki) -> int:
    context = ssl.create_default_context(cafile=str(pki.root_ca))
    with socket.create_connection(address, timeout=TIMEOUT) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number


def install_new_certificate(pki: Pki, served_files: tuple[Path, Path]) -> x509.Certificate:
    chain, key, certificate = pki.new_server_certificate()
    cert_file, key_file = served_files
    shutil.copy(key, key_file)
    shutil.copy(chain, cert_file)
    return certificate


def metric(broker: BrokerProcess, pki: Pki, name: str, listener: str, **labels: str) -> float:
    """The sum of the series of `name` with these labels (a counter without any series yet is 0)."""
    text = admin_call(broker, pki, "GET", "/metrics")
    wanted = {"listener": listener, **labels}
    total, found = 0.0, False
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        pairs = dict(pair.split("=", 1) for pair in line[len(name) + 1:line.index("}")].split(","))
        if all(pairs.get(key) == f'"{value}"' for key, value in wanted.items()):
            total += float(line.split()[-1])
            found = True
    if not found and not name.endswith("_total"):
        raise AssertionError(f"{name} for {wanted} not in /metrics")
    return total


def test_reload_by_sighup_and_admin_command_keeps_connected_clients(
        broker: BrokerProcess, users: None, pki: Pki, served_files, paho_client, monkeypatch, capsys) -> None:
    mqtt_address = broker.host_port("mqtt_tls")
    kept = paho_client(pki.alice, "paho-kept")
    assert not kept.connect(mqtt_address[1]).is_failure
    assert not kept.subscribe("certs/alice/#")[0].is_failure
    before = served_serial(mqtt_address, pki)

    first = install_new_certificate(pki, served_files)
    broker.process.send_signal(signal.SIGHUP)
    wait_until(lambda: served_serial(mqtt_address, pki) == first.serial_number, TIMEOUT, "SIGHUP reload")
    assert first.serial_number != before
    assert served_serial(broker.host_port("native_tls"), pki) == first.serial_number

    second = install_new_certificate(pki, served_files)
    monkeypatch.setenv("TIDEGATE_USER", "admin")
    monkeypatch.setenv("TIDEGATE_PASSWORD", ADMIN_PASSWORD)
    capsys.readouterr()
    code = cli.main(["admin", "tls-reload", "--admin", f"https://{broker.address('admin_tls')}",
                     "--cafile", str(pki.root_ca), "--json"])
    answer = json.loads(capsys.readouterr().out)
    assert code == 0
    assert set(answer["not_after"]) == {"native_tls", "mqtt_tls", "admin_tls"}
    assert served_serial(mqtt_address, pki) == second.serial_number

    kept.got_message.clear()
    kept.client.publish("certs/alice/after-reload", b"still here", qos=1)
    assert kept.got_message.wait(TIMEOUT), "the client connected before the reloads lost its connection"
    assert kept.messages[-1].payload == b"still here"
    assert metric(broker, pki, "tidegate_tls_certificate_not_after_seconds", "mqtt_tls") == \
        second.not_valid_after_utc.timestamp()


def test_a_reload_with_a_broken_file_keeps_the_old_certificate(broker: BrokerProcess, pki: Pki,
                                                               served_files, monkeypatch, capsys) -> None:
    address = broker.host_port("mqtt_tls")
    before = served_serial(address, pki)
    cert_file, _ = served_files
    good = cert_file.read_bytes()
    cert_file.write_text("garbage\n")
    try:
        monkeypatch.setenv("TIDEGATE_USER", "admin")
        monkeypatch.setenv("TIDEGATE_PASSWORD", ADMIN_PASSWORD)
        code = cli.main(["admin", "tls-reload", "--admin", f"https://{broker.address('admin_tls')}",
                         "--cafile", str(pki.root_ca)])
        assert code == 1
        assert "previous certificates stay in use" in capsys.readouterr().err
    finally:
        cert_file.write_bytes(good)
    assert served_serial(address, pki) == before


def test_handshake_failures_are_counted_by_listener(broker: BrokerProcess, pki: Pki) -> None:
    """An untrusted client certificate: counted under its listener with cause untrusted_certificate."""
    before = metric(broker, pki, "tidegate_tls_handshake_failures_total", "native_tls", cause="untrusted_certificate")
    context = ssl.create_default_context(cafile=str(pki.root_ca))
    context.load_cert_chain(str(pki.mallory.cert_file), str(pki.mallory.key_file))
    with pytest.raises((ssl.SSLError, ConnectionError)):
        with socket.create_connection(broker.host_port("native_tls"), timeout=TIMEOUT) as raw, \
                context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"\x00")
            if not tls.recv(16):
                raise ConnectionError("closed")
    wait_until(lambda: metric(broker, pki, "tidegate_tls_handshake_failures_total", "native_tls",
                              cause="untrusted_certificate") == before + 1,
               TIMEOUT, "the failed handshake to be counted")
