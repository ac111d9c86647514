"""End to end against a real `tidegate serve` started under umask 022: JWT logins over native HELLO and MQTT, the
audit log (logins, denials, admin changes; never a password or token), the security counters on /metrics, the
Prometheus alert rules naming exported metrics, and owner-only data files."""

from __future__ import annotations

import base64
import json
import os
import stat
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import paho.mqtt.client as paho
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from tidegate.client import Connection, Producer
from tidegate.core.errors import TidegateError
from tidegate.gateway.testing import BrokerProcess, wait_until

TIMEOUT = 10.0
ADMIN_PASSWORD = "adminpw-authn-e2e-7f3a"
SECRET = b"authn-e2e-secret-0123456789abcdef0123456789"
REPO = Path(__file__).resolve().parents[2]
ALERTS = REPO / "deploy" / "prometheus" / "tidegate-alerts.yml"
# MQTT 3.1.1 CONNACK 4/5 as paho 2 reports them (mapped onto the v5 reason codes 0x86/0x87)
REFUSED = (4, 5, 0x86, 0x87)


def token(sub: str = "alice", **extra: Any) -> str:
    return jwt.encode({"sub": sub, "aud": "tidegate", "exp": int(time.time()) + 300, **extra}, SECRET,
                      algorithm="HS256")


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    root = tmp_path_factory.mktemp("authn")
    secret = root / "jwt.secret"
    secret.write_bytes(SECRET)
    os.chmod(secret, 0o600)
    audit = root / "audit" / "audit.jsonl"
    process = BrokerProcess(root / "data", "--log-level", "warning", "--set", "security.login_delay_ms=0",
                            "--set", f"security.jwt_secret_file={secret}", "--set", "security.jwt_audience=tidegate",
                            "--set", f"audit.file={audit}", listeners=("native", "admin", "mqtt"),
                            env={"TIDEGATE_ADMIN_PASSWORD": ADMIN_PASSWORD})
    process.audit_path = audit  # type: ignore[attr-defined]
    old_umask = os.umask(0o022)  # what most systems run with: the broker must not rely on a tighter one
    try:
        process.start()
    finally:
        os.umask(old_umask)
    try:
        api(process, "POST", "users", {"name": "alice", "password": "alice-pw-9d2e"})
        yield process
    finally:
        assert process.stop() == 0, process.log()


def api(broker: BrokerProcess, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    auth = base64.b64encode(f"admin:{ADMIN_PASSWORD}".encode()).decode()
    request = urllib.request.Request(f"http://{broker.address('admin')}/api/security/{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"Basic {auth}"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def audit_lines(broker: BrokerProcess) -> list[dict[str, Any]]:
    path: Path = broker.audit_path  # type: ignore[attr-defined]
    return [json.loads(line) for line in path.read_text().splitlines()]


def scrape(broker: BrokerProcess) -> str:
    with urllib.request.urlopen(f"http://{broker.address('admin')}/metrics", timeout=TIMEOUT) as response:
        return response.read().decode()


def mqtt_connect(broker: BrokerProcess, username: str | None, password: str | None) -> int:
    host, port = broker.host_port("mqtt")
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="jwt-dev", protocol=paho.MQTTv311)
    if username is not None or password is not None:
        client.username_pw_set(username or "", password)
    codes: list[int] = []
    done = threading.Event()
    client.on_connect = lambda c, u, flags, rc, props=None: (codes.append(rc.value), done.set())
    client.connect(host, port)
    client.loop_start()
    try:
        assert done.wait(TIMEOUT), "no CONNACK"
    finally:
        client.disconnect()
        client.loop_stop()
    return codes[0]


# ---------------------------------------------------------------------------------------------- JWT
def test_native_hello_with_a_token_logs_in_as_its_subject(broker):
    with Producer(broker.native, "jwt-native", username="alice", password=token()).start():
        pass
    with Producer(broker.native, "jwt-native-2", password=token()).start():  # no user name: the claim names it
        pass


@pytest.mark.parametrize("username, make_password", [
    ("alice", lambda: token(exp=int(time.time()) - 3600)),  # expired
    ("alice", lambda: token(aud="someone-else")),  # wrong audience
    ("bob", lambda: token()),  # the given user name differs from the claim
    ("alice", lambda: jwt.encode({"sub": "alice", "aud": "tidegate", "exp": int(time.time()) + 300}, "x" * 40,
                                 algorithm="HS256")),  # forged
])
def test_native_hello_with_a_bad_token_is_refused(broker, username, make_password):
    with pytest.raises(TidegateError):
        Connection(broker.native, client_id="jwt-bad", username=username, password=make_password(), timeout=5).open()


def test_mqtt_connect_with_a_token_as_the_password(broker):
    assert mqtt_connect(broker, "alice", token()) == 0
    assert mqtt_connect(broker, "alice", token(exp=int(time.time()) - 3600)) in REFUSED
    none = base64.urlsafe_b64encode(b'{"alg":"none"}').rstrip(b"=").decode() + "." + \
        base64.urlsafe_b64encode(json.dumps({"sub": "alice", "aud": "tidegate",
                                             "exp": int(time.time()) + 300}).encode()).rstrip(b"=").decode() + "."
    assert mqtt_connect(broker, "alice", none) in REFUSED


# ---------------------------------------------------------------------------------------------- audit + metrics
def test_audit_log_records_logins_denials_and_admin_changes_without_secrets(broker):
    with pytest.raises(TidegateError):
        Connection(broker.native, client_id="audit-bad", username="alice", password="wrong-pw-41c9",
                   timeout=5).open()
    with Producer(broker.native, "audit-ok", username="alice", password="alice-pw-9d2e").start() as producer:
        for _ in range(3):
            with pytest.raises(TidegateError):
                producer.send("secret-topic", b"payload-that-must-not-be-logged")  # alice has no grants
    assert api(broker, "POST", "users", {"name": "dave", "password": "dave-pw-55b1", "roles": ["allow-all"]})[0] == 201
    assert api(broker, "POST", "users/dave/disable")[0] == 200
    auth = base64.b64encode(f"admin:{ADMIN_PASSWORD}".encode()).decode()
    reload = urllib.request.Request(f"http://{broker.address('admin')}/api/tls/reload", method="POST", data=b"",
                                    headers={"Authorization": f"Basic {auth}"})
    with urllib.request.urlopen(reload, timeout=TIMEOUT) as response:
        assert response.status == 200

    def logged() -> bool:
        events = audit_lines(broker)
        return any(e["event"] == "denied" for e in events) and any(
            e["event"] == "admin" and e["target"] == "user:dave" and e["operation"].endswith("disable")
            for e in events)

    wait_until(logged, TIMEOUT, "audit lines")
    events = audit_lines(broker)
    failed = [e for e in events if e["event"] == "login" and not e["ok"] and e.get("client_id") == "audit-bad"]
    assert failed and failed[0]["user"] == "alice" and failed[0]["source"] == "127.0.0.1"
    assert failed[0]["listener"] == "native" and failed[0]["mechanism"] == "password"
    assert any(e["event"] == "login" and e["ok"] and e["mechanism"] == "token" and e["user"] == "alice"
               for e in events)
    denied = [e for e in events if e["event"] == "denied" and e["user"] == "alice"]
    assert denied[0]["action"] == "Pub" and denied[0]["resource"] == "Topic:secret-topic"
    assert len(denied) == 1  # three denials in a row: one line (the rest are counted for the next one)
    disable = next(e for e in events if e["event"] == "admin" and e["operation"].endswith("/users/dave/disable"))
    assert disable["who"] == "admin" and disable["status"] == 200
    assert disable["before"]["enabled"] is True and disable["after"]["enabled"] is False
    created = next(e for e in events if e["event"] == "admin" and e["operation"] == "POST /api/security/users"
                   and e["target"] == "user:dave")
    assert created["before"] is None and created["after"]["roles"] == ["allow-all"]
    assert any(e["event"] == "admin" and e["target"] == "tls:certificates" and e["who"] == "admin" for e in events)
    text = broker.audit_path.read_text()  # type: ignore[attr-defined]
    for secret in ("alice-pw-9d2e", "dave-pw-55b1", "wrong-pw-41c9", ADMIN_PASSWORD, "payload-that-must-not",
                   "scrypt$", token().split(".")[0] + "."):
        assert secret not in text
    mode = stat.S_IMODE(os.stat(broker.audit_path).st_mode)  # type: ignore[attr-defined]
    assert mode == 0o600


def test_security_counters_are_exported_by_listener_and_cause(broker):
    with pytest.raises(TidegateError):
        Connection(broker.native, client_id="m", username="alice", password=token(exp=1), timeout=5).open()
    text = scrape(broker)
    assert 'tidegate_security_failed_logins_total{cause="token_expired",listener="native"}' in text
    assert 'tidegate_security_failed_logins_total{cause="bad_password",listener="native"}' in text
    assert 'tidegate_security_denials_total{action="Pub",listener="native"}' in text
    assert "# TYPE tidegate_security_limit_hits_total counter" in text
    assert "alice" not in "\n".join(line for line in text.splitlines() if line.startswith("tidegate_security"))


def test_alert_rules_parse_and_name_exported_metrics(broker):
    document = yaml.safe_load(ALERTS.read_text())
    rules = [rule for group in document["groups"] for rule in group["rules"]]
    names = {rule["alert"] for rule in rules}
    assert {"TidegateLoginBruteForce", "TidegateDenialStorm", "TidegateCertificateExpiresSoon"} <= names
    exported = set()
    for line in scrape(broker).splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            exported.add(name)
            if kind == "counter":
                exported.add(name + "_total")
    assert "tidegate_tls_certificate_not_after_seconds" in exported  # declared even without a TLS listener
    import re
    for rule in rules:
        assert rule["labels"]["severity"] and rule["annotations"]["summary"]
        named = set(re.findall(r"\btidegate_[a-z_]+", rule["expr"]))
        assert named, rule["alert"]
        assert named <= exported, f"{rule['alert']} names {named - exported}, which the broker does not export"


# ---------------------------------------------------------------------------------------------- file modes
def test_data_directory_is_0700_and_every_data_file_0600_under_umask_022(broker):
    api(broker, "POST", "policies", {"owner": "user:alice", "resource": "Topic:modes", "actions": "Pub",
                                     "decision": "Allow"})
    with Producer(broker.native, "modes", username="alice", password="alice-pw-9d2e").start() as producer:
        for i in range(5):
            producer.send("modes", f"m{i}".encode())
    data = broker.data_dir
    wait_until(lambda: (data / "meta.db-wal").exists() and (data / "checkpoint").exists()
               and any(path.is_file() for path in (data / "index").rglob("*")), TIMEOUT,
               "the metadata WAL, the index checkpoint and a queue index file")
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    seen = set()
    for directory, dirnames, filenames in os.walk(data):
        for name in dirnames:
            path = Path(directory, name)
            assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path
        for name in filenames:
            path = Path(directory, name)
            seen.add(path.relative_to(data).parts[0])
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, f"{path} is {stat.S_IMODE(path.stat().st_mode):o}"
    assert {"meta.db", "meta.db-wal", "meta.db-shm", "commitlog", "index", "checkpoint", "listeners.json"} <= seen
