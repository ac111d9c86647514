"""The real `tidegate serve` process: ephemeral ports, listeners.json, admin HTTP, clean stop on SIGTERM/SIGINT."""

from __future__ import annotations

import signal
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tidegate.core.storage.layout import StoreLayout
from tidegate.gateway.testing import START_TIMEOUT_S, BrokerProcess


def http_get(address: str, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@pytest.fixture
def serve(tmp_path: Path):
    started: list[BrokerProcess] = []

    def start(*extra: str) -> BrokerProcess:
        process = BrokerProcess(tmp_path / "data", *extra, log_path=tmp_path / f"serve-{len(started)}.log").spawn()
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_binds_ephemeral_ports_answers_admin_and_stops_cleanly_on_signal(serve, tmp_path: Path,
                                                                                signum: int) -> None:
    process = serve()
    listeners = process.wait_for_listeners()
    assert set(listeners) == {"native", "admin"}
    for address in listeners.values():
        host, port = address.rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0

    assert http_get(listeners["admin"], "/healthz") == (200, b'{"status": "ok"}\n')
    assert http_get(listeners["admin"], "/readyz")[0] == 200
    status, metrics = http_get(listeners["admin"], "/metrics")
    assert status == 200
    assert b"tidegate_uptime_seconds" in metrics
    assert b"tidegate_store_segments" in metrics
    assert http_get(listeners["admin"], "/nothing-here")[0] == 404
    native_host, native_port = listeners["native"].rsplit(":", 1)
    with socket.create_connection((native_host, int(native_port)), timeout=10):
        pass

    assert process.stop(signum) == 0, process.log()
    assert StoreLayout(tmp_path / "data").clean_shutdown_path.exists(), process.log()
    assert not (tmp_path / "data" / "listeners.json").exists()
    log = process.log()
    assert f"listening: native on {listeners['native']}" in log
    assert f"listening: admin on {listeners['admin']}" in log
    assert "Traceback" not in log


def test_a_restart_after_a_clean_stop_recovers_as_clean(serve) -> None:
    first = serve()
    first.wait_for_listeners()
    assert first.stop() == 0, first.log()
    second = serve()
    second.wait_for_listeners()
    assert second.stop() == 0, second.log()
    assert "after a clean shutdown" in second.log()


def test_async_flush_from_the_command_line_is_used(serve) -> None:
    process = serve("--flush", "async")
    process.wait_for_listeners()
    assert process.stop() == 0, process.log()
    assert "flush=async" in process.log()


def test_a_port_already_in_use_fails_start_up_with_one_error_line_and_exit_1(serve, tmp_path: Path) -> None:
    with socket.socket() as occupied:
        occupied.bind(("127.0.0.1", 0))
        occupied.listen()
        port = occupied.getsockname()[1]
        process = serve("--admin-port", str(port))
        assert process.process.wait(timeout=START_TIMEOUT_S) == 1
    log = process.log()
    errors = [line for line in log.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "start-up failed: CannotListenError" in errors[0], log
    assert "Traceback" not in log
    assert not (tmp_path / "data" / "listeners.json").exists()
