"""The gate's certificate mechanism (core/security/policy_gate.py) and the TLS configuration keys.

A verified client certificate's identity logs in as the user of that name: the user must exist and be enabled
(no mapping table); a certificate never logs in as `anonymous`, and a certificate login is held to the user's
policies like a password login."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from tidegate.core.errors import NotAuthenticated
from tidegate.core.security.gate import Action, Credentials, Resource
from tidegate.core.security.policy import PolicyEntry
from tidegate.core.security.policy_gate import LoginThrottle, PolicyGate
from tidegate.core.security.users import SecurityDirectory
from tidegate.core.storage.memory import MemoryMetadataStore
from tidegate.gateway.config import ConfigError, load_config, parse_set_option
from tidegate.gateway.listeners import PROTOCOLS, endpoints
from tidegate.gateway.tls import DEFAULT_CIPHERS


def outcome(deferred: Deferred) -> Any:
    out: list[Any] = []
    deferred.addBoth(out.append)
    assert out, "the Deferred has not fired"
    return out[0]


@pytest.fixture
def gate() -> PolicyGate:
    directory = SecurityDirectory(MemoryMetadataStore())
    directory.bootstrap("adminpw")
    directory.add_user("device-7", None)  # certificate only: no password
    directory.grant("user:device-7", PolicyEntry.create("Topic:telemetry/${username}/#", "Pub", "Allow"))
    directory.add_user("retired", None, enabled=False)
    return PolicyGate(directory, Clock(), allow_anonymous=True, throttle=LoginThrottle(Clock(), base_delay_s=0))


def certificate(identity: str) -> Credentials:
    return Credentials("certificate", username=identity, certificate_identity=identity, source="10.1.2.3",
                       listener="mqtt_tls")


def test_a_certificate_naming_an_enabled_user_logs_in_as_that_user(gate: PolicyGate) -> None:
    principal = outcome(gate.authenticate(certificate("device-7")))
    assert principal.name == "device-7" and not principal.anonymous
    assert gate.check(principal, Action.PUB, Resource.topic("telemetry/device-7/t"), "10.1.2.3")
    assert not gate.check(principal, Action.PUB, Resource.topic("telemetry/device-8/t"), "10.1.2.3")


@pytest.mark.parametrize("identity", ["nobody", "retired", "anonymous", ""])
def test_a_certificate_naming_no_enabled_user_is_refused(gate: PolicyGate, identity: str) -> None:
    """Unknown, disabled, the reserved anonymous user, or a certificate without the configured field."""
    result = outcome(gate.authenticate(certificate(identity)))
    assert isinstance(result, Failure) and result.check(NotAuthenticated)


def test_a_certificate_user_has_no_password_login(gate: PolicyGate) -> None:
    """A user made for a certificate (no password) cannot log in with any password."""
    result = outcome(gate.authenticate(Credentials("password", username="device-7", password=b"", source="1.2.3.4")))
    assert isinstance(result, Failure)


# ------------------------------------------------------------------------------------------------ config
def load(*settings: str):
    return load_config(overrides=[parse_set_option(s) for s in settings]).config


def test_tls_defaults() -> None:
    tls = load().tls
    assert (tls.verify, tls.min_version, tls.identity, tls.ciphers) == ("required", "1.2", "cn", DEFAULT_CIPHERS)
    assert "RSA-AES" not in DEFAULT_CIPHERS.replace("ECDHE-RSA-AES", "") and "CBC" not in DEFAULT_CIPHERS
    listeners = load().listeners
    assert all(getattr(listeners, name).plain_enabled for name in ("native", "mqtt", "amqp", "admin"))
    assert (listeners.admin.tls_enabled, listeners.admin.tls_port) == (False, 8443)


@pytest.mark.parametrize(("settings", "message"), [
    (("tls.verify=sometimes",), "tls.verify must be one of none, optional, required"),
    (("tls.min_version=1.1",), "tls.min_version must be one of 1.2, 1.3"),
    (("tls.identity=serial",), "tls.identity must be one of cn, san_dns, san_email, san_uri"),
    (("tls.verify=optional",), "tls.verify is \"optional\" .* but tls.ca_file is empty"),
    (("tls.ciphers= ",), "tls.ciphers must not be empty"),
    (("listeners.native.plain_enabled=false",), "listeners.native.plain_enabled is false .* no other port"),
    (("listeners.admin.tls_enabled=true",), "listeners.admin.tls_enabled is true .* tls.cert_file"),
])
def test_bad_tls_settings_are_one_line_errors(settings: tuple[str, ...], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(*settings)


def test_verify_and_identity_words_are_case_insensitive() -> None:
    tls = load("tls.verify=OPTIONAL", "tls.ca_file=/x/ca.pem", "tls.identity=SAN_DNS").tls
    assert (tls.verify, tls.identity) == ("optional", "san_dns")


@pytest.mark.parametrize("row", PROTOCOLS, ids=lambda row: row.name)
def test_every_protocol_can_switch_its_plain_port_off(row, tmp_path: Path) -> None:
    """plain_enabled = false leaves only the TLS endpoint(s) of the section; enabled = false leaves nothing
    (gateway/listeners.py build_all skips the section)."""
    name = row.name
    config = load(f"listeners.{name}.plain_enabled=false", f"listeners.{name}.tls_enabled=true",
                  "tls.cert_file=/x/c.pem", "tls.key_file=/x/k.pem", "listeners.mqtt.ws_enabled=false")
    names = [e.name for e in endpoints(name, getattr(config.listeners, name))]
    assert names == [f"{name}_tls"]
    assert [e.tls for e in endpoints(name, getattr(config.listeners, name))] == [True]
    assert not getattr(load(f"listeners.{name}.enabled=false").listeners, name).enabled


def test_switched_off_plain_ports_do_not_count_as_port_conflicts() -> None:
    """A disabled plain port may share its number with another listener's port."""
    load("listeners.native.plain_enabled=false", "listeners.native.tls_enabled=true",
         "tls.cert_file=/x/c.pem", "tls.key_file=/x/k.pem", "listeners.native.port=1883")
