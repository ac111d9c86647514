"""Start-up of the whole process (gateway/app.py, in-process with a memory reactor): TIDEGATE_ADMIN_PASSWORD creates
`admin` as a super-user on first start only, key files open to group/others stop start-up with a clear error, the
data directory is tightened to 0700/0600, and the [security]/[audit] keys reach the gate."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock

from tidegate.core.security.keyfiles import InsecureKeyFile, check_private_file
from tidegate.core.security.users import SUPERUSER_ROLE, verify_password
from tidegate.gateway import app
from tidegate.gateway.config import ConfigError, load_config, parse_set_option

SECRET = b"startup-test-secret-0123456789abcdef-xyz"


def config(tmp_path: Path, *settings: str) -> Any:
    base = [f"broker.data_dir={tmp_path / 'data'}", "listeners.mqtt.enabled=false", "listeners.amqp.enabled=false"]
    return load_config(overrides=[parse_set_option(s) for s in (*base, *settings)]).config


def start(cfg: Any) -> tuple[Any, list[Any]]:
    process = app.TidegateProcess(cfg, MemoryReactorClock())
    process.startService()
    assert process.started is not None and process.started.called
    failures: list[Any] = []
    process.started.addErrback(failures.append)
    return process, failures


def stop(process: Any) -> None:
    done: list[Any] = []
    process.stopService().addBoth(done.append)
    assert done and done[0] is None, done


def test_admin_password_creates_admin_as_super_user_on_first_start_only(tmp_path, monkeypatch):
    monkeypatch.setenv("TIDEGATE_ADMIN_PASSWORD", "first-pw")
    process, failures = start(config(tmp_path))
    assert not failures
    admin = process.gate.directory.user("admin")
    assert admin is not None and admin.enabled and SUPERUSER_ROLE in admin.roles
    assert process.gate.directory.is_superuser("admin") and verify_password(b"first-pw", admin.password_hash)
    stop(process)
    # a later start with another value changes nothing: the variable is a first-start bootstrap, not a reset
    monkeypatch.setenv("TIDEGATE_ADMIN_PASSWORD", "second-pw")
    process, failures = start(config(tmp_path))
    assert not failures
    admin = process.gate.directory.user("admin")
    assert verify_password(b"first-pw", admin.password_hash) and not verify_password(b"second-pw",
                                                                                      admin.password_hash)
    stop(process)


def test_without_admin_password_no_admin_user_exists(tmp_path, monkeypatch):
    monkeypatch.delenv("TIDEGATE_ADMIN_PASSWORD", raising=False)
    process, failures = start(config(tmp_path))
    assert not failures
    assert process.gate.directory.user("admin") is None
    assert [u.name for u in process.gate.directory.users()] == ["anonymous"]
    stop(process)


def test_a_tls_key_readable_by_others_stops_start_up_with_a_clear_error(tmp_path):
    key = tmp_path / "server.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    os.chmod(key, 0o644)
    process, failures = start(config(tmp_path, f"tls.cert_file={tmp_path / 'server.crt'}", f"tls.key_file={key}"))
    assert failures and failures[0].check(InsecureKeyFile)
    message = failures[0].getErrorMessage()
    assert "tls.key_file" in message and str(key) in message and "0644" in message and "chmod 600" in message
    assert process.gate.__class__.__name__ == "AllowAllGate" and not process.addresses  # nothing listened


def test_a_tls_reload_refuses_a_key_made_readable_by_others_since_start(tmp_path):
    key = tmp_path / "server.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    os.chmod(key, 0o640)
    process = app.TidegateProcess(config(tmp_path, f"tls.cert_file={tmp_path / 'server.crt'}", f"tls.key_file={key}"),
                                  MemoryReactorClock())
    with pytest.raises(InsecureKeyFile, match="chmod 600"):
        process.reload_tls()
    assert process.tls_metrics.reloads == 0


def test_a_loose_jwt_secret_stops_start_up(tmp_path):
    secret = tmp_path / "jwt.secret"
    secret.write_bytes(SECRET)
    os.chmod(secret, 0o604)
    process, failures = start(config(tmp_path, f"security.jwt_secret_file={secret}"))
    assert failures and failures[0].check(InsecureKeyFile)
    assert "jwt_secret_file" in failures[0].getErrorMessage()
    stop(process)


def test_check_private_file():
    with pytest.raises(InsecureKeyFile, match="no such file"):
        check_private_file("/nonexistent/key", "tls.key_file")
    check_private_file("/nonexistent/key", "tls.key_file", missing_ok=True)
    with pytest.raises(InsecureKeyFile, match="not a regular file"):
        check_private_file("/", "tls.key_file")


def test_an_old_data_directory_is_tightened_at_start(tmp_path):
    data = tmp_path / "data"
    (data / "commitlog").mkdir(parents=True)
    os.chmod(data, 0o755)
    os.chmod(data / "commitlog", 0o755)
    leftover = data / "commitlog" / "stray.tmp"
    leftover.write_bytes(b"x")
    os.chmod(leftover, 0o644)
    process, failures = start(config(tmp_path))
    assert not failures
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert stat.S_IMODE((data / "commitlog").stat().st_mode) == 0o700
    assert stat.S_IMODE(leftover.stat().st_mode) == 0o600
    stop(process)


def test_security_and_audit_keys_reach_the_gate(tmp_path):
    secret = tmp_path / "jwt.secret"
    secret.write_bytes(SECRET)
    os.chmod(secret, 0o600)
    audit = tmp_path / "audit.jsonl"
    process, failures = start(config(tmp_path, f"security.jwt_secret_file={secret}", "security.jwt_audience=tg",
                                     "security.jwt_issuer=idp", "security.jwt_username_claim=name",
                                     "security.jwt_leeway_s=5", f"audit.file={audit}", "audit.max_bytes=8192",
                                     "listeners.native.host=0.0.0.0"))
    assert not failures
    tokens = process.gate.tokens
    assert (tokens.audience, tokens.issuer, tokens.username_claim, tokens.leeway_s) == ("tg", "idp", "name", 5)
    assert process.gate.audit.enabled and process.gate.audit is process.audit
    assert process.gate.metrics is process.metrics.security
    assert process.gate.listener_hosts["native"] == "0.0.0.0"
    assert not process.gate.anonymous_allowed_from("127.0.0.1", "native")  # bound to every address
    assert process.gate.anonymous_allowed_from("127.0.0.1", "admin")
    stop(process)
    assert stat.S_IMODE(audit.stat().st_mode) == 0o600


@pytest.mark.parametrize("setting, words", [
    ("security.jwt_leeway_s=-1", "security.jwt_leeway_s must be 0-3600"),
    ("security.jwt_username_claim= ", "security.jwt_username_claim must not be empty"),
    ("audit.max_bytes=10", "audit.max_bytes must be at least 4096"),
    ("audit.backup_count=-1", "audit.backup_count must be at least 0"),
])
def test_bad_security_and_audit_settings_are_config_errors(tmp_path, setting, words):
    with pytest.raises(ConfigError, match=words):
        config(tmp_path, setting)


@pytest.mark.parametrize(("content", "mode", "expected"), [
    (b"scrape-token-0123456789\n", 0o644, "chmod 600"),
    (b"short\n", 0o600, "at least 16 characters"),
])
def test_a_loose_or_short_metrics_token_stops_start_up(tmp_path, content, mode, expected):
    token = tmp_path / "metrics.token"
    token.write_bytes(content)
    os.chmod(token, mode)
    process, failures = start(config(tmp_path, f"security.metrics_token_file={token}"))
    assert failures and failures[0].check(InsecureKeyFile)
    assert "metrics_token_file" in failures[0].getErrorMessage() and expected in failures[0].getErrorMessage()
    assert not process.addresses  # nothing listened
