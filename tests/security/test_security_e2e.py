"""End to end against a real `tidegate serve`: the CLI manages users and policies over the admin API, and MQTT
clients are authenticated and authorized by them (wrong password, per-user topics, filters, a user disabled while
connected)."""

from __future__ import annotations

import io
import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator

import paho.mqtt.client as paho
import pytest

from tidegate.gateway import cli
from tidegate.gateway.testing import BrokerProcess

from .mqtt_helpers import Mqtt

TIMEOUT = 10.0
ADMIN_PASSWORD = "adminpw-e2e"


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    root = tmp_path_factory.mktemp("secure")
    process = BrokerProcess(root / "data", "--log-level", "warning", "--set", "security.login_delay_ms=0",
                            listeners=("native", "admin", "mqtt"), env={"TIDEGATE_ADMIN_PASSWORD": ADMIN_PASSWORD})
    process.start()
    try:
        yield process
    finally:
        assert process.stop() == 0, process.log()


@pytest.fixture
def tidegate(broker: BrokerProcess, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    for name in list(os.environ):
        if name.startswith("TIDEGATE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("TIDEGATE_ADMIN", broker.address("admin"))
    monkeypatch.setenv("TIDEGATE_USER", "admin")
    monkeypatch.setenv("TIDEGATE_PASSWORD", ADMIN_PASSWORD)

    def run(*argv: str, stdin: str | None = None) -> tuple[int, str, str]:
        if stdin is not None:
            monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        capsys.readouterr()
        code = cli.main(list(argv))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture(scope="module")
def alice(broker: BrokerProcess) -> str:
    """alice, set up exactly as issue 9 writes it (run once for the module)."""
    env = {"TIDEGATE_ADMIN": broker.address("admin"), "TIDEGATE_USER": "admin", "TIDEGATE_PASSWORD": ADMIN_PASSWORD}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    stdin, os_stdin = io.StringIO("s3cret"), None
    import sys

    os_stdin, sys.stdin = sys.stdin, stdin
    try:
        assert cli.main(["user", "add", "alice", "--password-stdin"]) == 0
        assert cli.main(["acl", "grant", "--user", "alice", "--allow", "Pub", "--resource",
                         "Topic:telemetry/${username}/#"]) == 0
        assert cli.main(["acl", "grant", "--user", "alice", "--allow", "Sub", "--resource",
                         "Topic:commands/${username}/#"]) == 0
        assert cli.main(["acl", "grant", "--user", "anonymous", "--deny", "Sub", "--resource", "Topic:private/#"]) == 0
    finally:
        sys.stdin = os_stdin
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return "alice"


# ---------------------------------------------------------------------------------------------- CLI
def test_acl_check_and_list_answer_json_as_the_issue_writes(alice, tidegate):
    code, out, err = tidegate("acl", "check", "--user", "alice", "--action", "Pub", "--resource",
                              "Topic:telemetry/alice/temp", "--json")
    assert code == 0, err
    answer = json.loads(out)
    assert answer["decision"] == "allow"
    assert answer["entry"]["resource"] == "Topic:telemetry/${username}/#" and answer["entry"]["owner"] == "user:alice"
    code, out, _ = tidegate("acl", "check", "--user", "alice", "--action", "Pub", "--resource",
                            "Topic:telemetry/bob/temp", "--json")
    assert json.loads(out)["decision"] == "deny"
    code, out, _ = tidegate("acl", "list", "--json")
    assert code == 0
    owners = {(e["owner"], e["decision"], e["resource"]) for e in json.loads(out)}
    assert ("user:anonymous", "Deny", "Topic:private/#") in owners
    assert ("user:alice", "Allow", "Topic:commands/${username}/#") in owners


def test_user_role_and_revoke_commands(alice, tidegate):
    assert tidegate("user", "add", "carol", "--password-stdin", stdin="pw1\n")[0] == 0
    assert tidegate("user", "passwd", "carol", "--password-stdin", stdin="pw2")[0] == 0
    assert tidegate("role", "add", "devices")[0] == 0
    assert tidegate("role", "assign", "devices", "--user", "carol")[0] == 0
    code, out, _ = tidegate("user", "list", "--json")
    carol = next(u for u in json.loads(out) if u["name"] == "carol")
    assert carol["roles"] == ["devices"] and "password_hash" not in carol
    assert "devices" in json.loads(tidegate("role", "list", "--json")[1])
    code, out, _ = tidegate("acl", "grant", "--role", "devices", "--allow", "Pub,Sub", "--resource", "Topic:dev/#",
                            "--source", "127.0.0.0/8", "--json")
    entry_id = json.loads(out)["id"]
    assert tidegate("acl", "revoke", "--role", "devices", "--id", str(entry_id))[0] == 0
    code, _, err = tidegate("acl", "revoke", "--role", "devices", "--id", str(entry_id))
    assert code == 1 and "HTTP 404" in err
    code, _, err = tidegate("user", "add", "carol", "--password-stdin", stdin="x")
    assert code == 1 and "HTTP 409" in err
    code, _, err = tidegate("acl", "grant", "--user", "carol", "--allow", "Publish", "--resource", "Topic:x")
    assert code == 1 and "HTTP 400" in err
    assert tidegate("role", "delete", "devices")[0] == 0
    assert tidegate("user", "delete", "carol")[0] == 0


def test_cli_needs_an_administrator(alice, tidegate, monkeypatch):
    monkeypatch.setenv("TIDEGATE_PASSWORD", "wrong")
    code, _, err = tidegate("user", "list")
    assert code == 1 and "HTTP 401" in err
    monkeypatch.setenv("TIDEGATE_USER", "alice")
    monkeypatch.setenv("TIDEGATE_PASSWORD", "s3cret")
    code, _, err = tidegate("user", "list")
    assert code == 1 and "HTTP 403" in err
    monkeypatch.delenv("TIDEGATE_USER")
    code, _, err = tidegate("user", "list")
    assert code == 2 and "TIDEGATE_USER" in err


# ---------------------------------------------------------------------------------------------- admin HTTP
def http(broker: BrokerProcess, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://{broker.address('admin')}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_admin_api_checks_host_and_credentials_while_health_stays_open(broker, alice):
    import base64

    admin = {"Authorization": "Basic " + base64.b64encode(f"admin:{ADMIN_PASSWORD}".encode()).decode()}
    assert http(broker, "/api/security/users", admin)[0] == 200
    assert http(broker, "/api/security/users")[0] == 401
    assert http(broker, "/api/security/users", {**admin, "Host": "evil.example:8080"})[0] == 403  # DNS rebinding
    assert http(broker, "/healthz")[0] == 200
    assert http(broker, "/healthz", {"Host": "evil.example"})[0] == 200


# ---------------------------------------------------------------------------------------------- MQTT


@pytest.fixture
def mqtt_port(broker: BrokerProcess) -> int:
    return broker.host_port("mqtt")[1]


def test_wrong_password_is_refused_the_mqtt_way(alice, mqtt_port):
    v5 = Mqtt(paho.MQTTv5, "wrong5")
    try:
        reason = v5.connect(mqtt_port, "alice", "nope")
        assert reason.value == 0x86  # Bad User Name or Password
    finally:
        v5.close()
    v3 = Mqtt(paho.MQTTv311, "wrong3")
    try:
        reason = v3.connect(mqtt_port, "alice", "nope")
        assert reason.value in (4, 0x86)  # 3.1.1 return code 4 (paho reports it as 0x86)
    finally:
        v3.close()


def test_alice_publishes_only_under_her_name_mqtt5(alice, mqtt_port):
    client = Mqtt(paho.MQTTv5, "alice-5")
    try:
        assert client.connect(mqtt_port, "alice", "s3cret").value == 0
        assert client.publish("telemetry/alice/temp").value == 0
        assert client.publish("telemetry/bob/x").value == 0x87  # Not authorized
        assert client.subscribe("#")[0].value == 0x87
        assert client.subscribe("commands/alice/#")[0].value == 1
        assert client.subscribe("commands/#")[0].value == 0x87
    finally:
        client.close()


def test_a_denied_publish_closes_a_mqtt311_connection(alice, mqtt_port):
    client = Mqtt(paho.MQTTv311, "alice-3")
    try:
        assert client.connect(mqtt_port, "alice", "s3cret").value == 0
        assert client.publish("telemetry/alice/temp").value == 0
        client.client.publish("telemetry/bob/x", b"x", qos=1)
        assert client.disconnected.wait(TIMEOUT), "3.1.1 has no PUBACK reason: the connection must be closed"
    finally:
        client.close()


def test_anonymous_loopback_client_keeps_the_readme_tour_but_not_denied_topics(alice, mqtt_port):
    client = Mqtt(paho.MQTTv5, "anon")
    try:
        assert client.connect(mqtt_port).value == 0
        assert client.publish("tour/anything").value == 0
        assert client.subscribe("tour/#")[0].value == 1
        assert client.subscribe("private/#")[0].value == 0x87
    finally:
        client.close()


def test_a_user_disabled_while_connected_is_denied_at_the_next_action(alice, mqtt_port, tidegate):
    assert tidegate("user", "add", "dave", "--password-stdin", stdin="davepw")[0] == 0
    assert tidegate("acl", "grant", "--user", "dave", "--allow", "Pub", "--resource", "Topic:d/#")[0] == 0
    client = Mqtt(paho.MQTTv5, "dave")
    try:
        assert client.connect(mqtt_port, "dave", "davepw").value == 0
        assert client.publish("d/1").value == 0
        assert tidegate("user", "disable", "dave")[0] == 0
        assert client.publish("d/2").value == 0x87
    finally:
        client.close()
    again = Mqtt(paho.MQTTv5, "dave-again")
    try:
        assert again.connect(mqtt_port, "dave", "davepw").value == 0x86
    finally:
        again.close()


# ---------------------------------------------------------------------------------------------- native
def test_native_clients_are_decided_by_the_same_policies(alice, broker, tidegate):
    """Native clients without credentials connect as `anonymous` on loopback; a Deny added for `anonymous` applies
    to them at once, and revoking it restores the right."""
    from tidegate.client import Admin, Producer
    from tidegate.core.errors import NotAuthorized

    deny = ("--user", "anonymous", "--deny", "Pub,Delete", "--resource", "Topic:native-secret*")
    with Producer(broker.native) as producer, Admin(broker.native) as admin:
        producer.send("native-open", b"x")
        assert tidegate("acl", "grant", *deny)[0] == 0
        try:
            with pytest.raises(NotAuthorized):
                producer.send("native-secret", b"x")
            with pytest.raises(NotAuthorized):
                admin.delete_topic("native-secret-2")
            producer.send("native-open", b"still fine")
        finally:
            assert tidegate("acl", "revoke", *deny)[0] == 0
        producer.send("native-secret", b"allowed again")


def test_native_hello_credentials_log_in_as_the_user_and_a_wrong_password_is_refused(alice, broker):
    """HELLO carries username and password to the same gate: alice may publish under telemetry/alice/ only."""
    from tidegate.client import Producer
    from tidegate.core.errors import TidegateError

    with Producer(broker.native, username="alice", password=b"s3cret") as producer:
        producer.send("telemetry", b"21.5", subject="alice/temp")
        with pytest.raises(TidegateError) as denied:
            producer.send("telemetry", b"x", subject="bob/temp")
        assert denied.value.code == 21  # NOT_AUTHORIZED
    with pytest.raises(TidegateError) as refused:
        with Producer(broker.native, username="alice", password=b"wrong") as producer:
            producer.send("telemetry", b"x", subject="alice/temp")
    assert refused.value.code == 22  # NOT_AUTHENTICATED


def test_admin_api_refuses_bad_bodies_and_never_returns_hashes(broker, alice):
    import base64

    auth = {"Authorization": "Basic " + base64.b64encode(f"admin:{ADMIN_PASSWORD}".encode()).decode(),
            "Content-Type": "application/json"}

    def post(path: str, body: bytes) -> tuple[int, dict]:
        request = urllib.request.Request(f"http://{broker.address('admin')}/api/security/{path}", data=body,
                                         headers=auth, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    assert post("users/alice/password", b'{"password": ""}')[0] == 400
    assert post("users/alice/password", b'{"password": 5}')[0] == 400
    assert post("users/alice/password", json.dumps({"password": "x" * 2000}).encode())[0] == 400
    assert post("users", b"[1]")[0] == 400
    assert post("users", b"not json")[0] == 400
    assert post("policies", b'{"owner": "user:alice", "resource": "Topic:a/#/b", "actions": ["Pub"], '
                            b'"decision": "Allow"}')[0] == 400
    status, user = post("users", b'{"name": "erin", "password": "erinpw"}')
    assert status == 201 and "password_hash" not in user and user["has_password"] is True
    assert "scrypt" not in json.dumps(http(broker, "/api/security/users", auth)[1])
