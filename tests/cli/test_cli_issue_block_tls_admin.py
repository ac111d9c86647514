"""Issue 9's CLI block, run exactly as written (bash, the installed `tidegate` script) against a real broker whose
admin listener runs TLS only, found through TIDEGATE_ADMIN_URL / TIDEGATE_ADMIN_CAFILE; plus every other security
command (`user passwd/enable/delete/list`, `role add/delete/list/assign/unassign`, `acl revoke`) over
`--admin https://... --cafile`, and the ways a wrong address or CA fails. The PKI is made at test time."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from tidegate.gateway import cli
from tidegate.gateway.testing import BrokerProcess

from ..security.certs import Pki, make_pki
from ..security.mqtt_helpers import Mqtt

TIMEOUT = 10.0
ADMIN_PASSWORD = "adminpw-cli-tls"
ISSUE_BLOCK = r"""
echo -n s3cret | tidegate user add alice --password-stdin
tidegate acl grant --user alice --allow Pub --resource 'Topic:telemetry/${username}/#'
tidegate acl grant --user alice --allow Sub --resource 'Topic:commands/${username}/#'
tidegate acl grant --user anonymous --deny Sub --resource 'Topic:private/#'
tidegate acl check --user alice --action Pub --resource 'Topic:telemetry/alice/temp' --json
tidegate acl list --json
tidegate user disable alice
"""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[BrokerProcess]:
    settings = {"security.login_delay_ms": "0", "tls.cert_file": pki.server_chain, "tls.key_file": pki.server_key,
                "listeners.admin.tls_enabled": "true", "listeners.admin.tls_port": "0",
                "listeners.admin.plain_enabled": "false"}
    args = [item for key, value in settings.items() for item in ("--set", f"{key}={value}")]
    process = BrokerProcess(tmp_path_factory.mktemp("cli-tls") / "data", "--log-level", "warning", *args,
                            listeners=("native", "admin", "mqtt"), env={"TIDEGATE_ADMIN_PASSWORD": ADMIN_PASSWORD})
    process.start()
    try:
        yield process
    finally:
        assert process.stop() == 0, process.log()


def admin_url(broker: BrokerProcess) -> str:
    return f"https://{broker.address('admin_tls')}"


def shell_env(broker: BrokerProcess, pki: Pki) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDEGATE_")}
    env.update(TIDEGATE_ADMIN_URL=admin_url(broker), TIDEGATE_ADMIN_CAFILE=str(pki.root_ca),
               TIDEGATE_USER="admin", TIDEGATE_PASSWORD=ADMIN_PASSWORD,
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    return env


def sh(line: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", line], env=env, capture_output=True, text=True, timeout=60, check=False)




def test_the_issue_block_works_as_written_over_an_https_admin_port(broker: BrokerProcess, pki: Pki) -> None:
    """Every line of the block, in order, through bash; alice's live MQTT connection is denied its next publish
    after `tidegate user disable alice`."""
    assert "admin" not in broker.addresses  # TLS only: no plain admin port to fall back on
    env = shell_env(broker, pki)
    lines = ISSUE_BLOCK.strip().splitlines()
    outputs = {}
    alice = Mqtt(paho.MQTTv5, "alice-device")
    try:
        for line in lines:
            if line == "tidegate user disable alice":
                assert alice.connect(broker.host_port("mqtt")[1], "alice", "s3cret").value == 0
                assert alice.publish("telemetry/alice/temp").value == 0
                assert alice.publish("telemetry/bob/temp").value == 0x87  # her policies hold
            done = sh(line, env)
            assert done.returncode == 0, f"{line}\n{done.stderr}"
            outputs[line] = done.stdout
        assert alice.publish("telemetry/alice/temp").value == 0x87  # disabled while connected: denied
    finally:
        alice.close()
    check = json.loads(outputs[lines[4]])
    assert check["decision"] == "allow"
    assert check["entry"]["owner"] == "user:alice" and check["entry"]["resource"] == "Topic:telemetry/${username}/#"
    assert check["entry"]["decision"] == "Allow" and "Pub" in check["entry"]["actions"]
    entries = {(e["owner"], e["decision"], e["resource"], tuple(e["actions"])) for e in json.loads(outputs[lines[5]])}
    assert {("user:alice", "Allow", "Topic:telemetry/${username}/#", ("Pub",)),
            ("user:alice", "Allow", "Topic:commands/${username}/#", ("Sub",)),
            ("user:anonymous", "Deny", "Topic:private/#", ("Sub",))} <= entries
    again = Mqtt(paho.MQTTv5, "alice-again")
    try:
        assert again.connect(broker.host_port("mqtt")[1], "alice", "s3cret").value == 0x86  # disabled: no login
    finally:
        again.close()


@pytest.fixture
def tidegate(broker: BrokerProcess, pki: Pki, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """`tidegate ...` in process with --admin https://... --cafile ... (no admin address in the environment)."""
    for name in list(os.environ):
        if name.startswith("TIDEGATE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("TIDEGATE_USER", "admin")
    monkeypatch.setenv("TIDEGATE_PASSWORD", ADMIN_PASSWORD)

    def run(*argv: str, stdin: str | None = None, tls: bool = True) -> tuple[int, str, str]:
        if stdin is not None:
            monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        capsys.readouterr()
        extra = ["--admin", admin_url(broker), "--cafile", str(pki.root_ca)] if tls else []
        code = cli.main([*argv, *extra])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def test_every_other_security_command_over_https(broker: BrokerProcess, pki: Pki, tidegate) -> None:
    assert tidegate("user", "add", "carol", "--password-stdin", stdin="pw1")[0] == 0
    assert tidegate("user", "passwd", "carol", "--password-stdin", stdin="pw2")[0] == 0
    assert tidegate("role", "add", "devices")[0] == 0
    assert tidegate("role", "assign", "devices", "--user", "carol")[0] == 0
    code, out, _ = tidegate("user", "list", "--json")
    assert code == 0 and {"name": "carol", "roles": ["devices"]}.items() <= next(
        u for u in json.loads(out) if u["name"] == "carol").items()
    assert "devices" in json.loads(tidegate("role", "list", "--json")[1])
    grant = ("--role", "devices", "--allow", "Pub,Sub", "--resource", "Topic:dev/#")
    assert tidegate("acl", "grant", *grant)[0] == 0
    assert tidegate("acl", "revoke", *grant)[0] == 0  # revoke by the entry's fields
    assert tidegate("acl", "grant", *grant)[0] == 0
    code, out, _ = tidegate("acl", "list", "--role", "devices", "--json")
    (entry,) = json.loads(out)
    assert tidegate("acl", "revoke", "--role", "devices", "--id", str(entry["id"]))[0] == 0  # ... and by id
    assert json.loads(tidegate("acl", "list", "--role", "devices", "--json")[1]) == []
    assert tidegate("user", "disable", "carol")[0] == 0
    assert tidegate("user", "enable", "carol")[0] == 0
    assert tidegate("role", "unassign", "devices", "--user", "carol")[0] == 0
    assert tidegate("role", "delete", "devices")[0] == 0
    assert tidegate("user", "delete", "carol")[0] == 0
    names = [u["name"] for u in json.loads(tidegate("user", "list", "--json")[1])]
    assert "carol" not in names and "admin" in names
    assert "devices" not in json.loads(tidegate("role", "list", "--json")[1])


def test_a_wrong_scheme_or_ca_fails_in_one_line(broker: BrokerProcess, pki: Pki, tidegate, tmp_path: Path) -> None:
    code, _, err = tidegate("user", "list", "--admin", broker.address("admin_tls"), tls=False)  # plain http
    assert code == 1 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    code, _, err = tidegate("user", "list", "--admin", admin_url(broker), tls=False)  # system store: untrusted
    assert code == 1 and "CERTIFICATE_VERIFY_FAILED" in err and len(err.strip().splitlines()) == 1
    code, _, err = tidegate("user", "list", "--admin", admin_url(broker), "--cafile",
                            str(pki.mallory.cert_file), tls=False)  # a CA that did not sign the broker
    assert code == 1 and "CERTIFICATE_VERIFY_FAILED" in err


def test_tls_reload_uses_the_same_client_and_environment(broker: BrokerProcess, pki: Pki, monkeypatch,
                                                         capsys) -> None:
    for name, value in shell_env(broker, pki).items():
        if name.startswith("TIDEGATE_"):
            monkeypatch.setenv(name, value)
    capsys.readouterr()
    assert cli.main(["admin", "tls-reload", "--json"]) == 0
    assert "admin_tls" in json.loads(capsys.readouterr().out)["not_after"]


@pytest.mark.parametrize(("admin", "extra", "expected"), [
    ("localhost:notaport", [], "--admin"),
    ("https://127.0.0.1:1", ["--cafile", "/nonexistent/ca.pem"], "--cafile /nonexistent/ca.pem"),
])
def test_a_malformed_admin_address_or_ca_file_is_one_usage_error(monkeypatch, capsys, admin, extra, expected):
    monkeypatch.setenv("TIDEGATE_USER", "admin")
    monkeypatch.setenv("TIDEGATE_PASSWORD", "pw")
    assert cli.main(["user", "list", "--admin", admin, *extra]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
