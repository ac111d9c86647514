"""The [security] config section and the gate the process builds from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tidegate.core.security.gate import Credentials
from tidegate.core.security.policy_gate import PolicyGate, open_policy_gate
from tidegate.core.storage.memory import MemoryMetadataStore
from tidegate.gateway.config import ConfigError, load_config, parse_set_option


def load(*sets: str, toml: str = "", tmp_path: Path | None = None, environ: dict[str, str] | None = None):
    config_file = None
    if toml:
        assert tmp_path is not None
        config_file = tmp_path / "tidegate.toml"
        config_file.write_text(toml)
    return load_config(config_file, environ or {}, [parse_set_option(s) for s in sets]).config


def test_defaults_accept_anonymous_from_loopback_and_slow_failed_logins():
    security = load().security
    assert security.allow_anonymous == "loopback"
    assert security.login_delay_ms == 200 and security.login_delay_max_ms == 10_000


@pytest.mark.parametrize(("toml", "expected"), [("true", "true"), ("false", "false"), ('"loopback"', "loopback"),
                                                ('"LOOPBACK"', "loopback"), ('"yes"', "true")])
def test_allow_anonymous_takes_a_word_or_a_toml_boolean(tmp_path, toml, expected):
    assert load(toml=f"[security]\nallow_anonymous = {toml}\n", tmp_path=tmp_path).security.allow_anonymous == expected


def test_allow_anonymous_from_env_and_cli():
    assert load(environ={"TIDEGATE_SECURITY__ALLOW_ANONYMOUS": "false"}).security.allow_anonymous == "false"
    assert load("security.allow_anonymous=true").security.allow_anonymous == "true"


@pytest.mark.parametrize("setting", ["security.allow_anonymous=sometimes", "security.login_delay_ms=-1",
                                     "security.login_delay_sources=0", "security.unknown=1"])
def test_bad_security_values_are_refused(setting):
    with pytest.raises(ConfigError):
        load(setting)


def test_open_policy_gate_bootstraps_admin_and_maps_the_anonymous_policy():
    store = MemoryMetadataStore()
    gate = open_policy_gate(store, clock=None, allow_anonymous="false", admin_password="adminpw")
    assert isinstance(gate, PolicyGate) and gate.allow_anonymous is False
    assert gate.directory.is_superuser("admin")
    out: list = []
    gate.authenticate(Credentials("password", username="admin", password=b"adminpw", source="10.0.0.1")).addBoth(
        out.append)
    assert out[0].name == "admin"
    again = open_policy_gate(store, clock=None, allow_anonymous="true")  # a restart keeps what is stored
    assert again.allow_anonymous is True and again.directory.user("admin") is not None
